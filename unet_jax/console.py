"""What the entry points print: their own lines, not the libraries' chatter.

Orbax logs a dozen INFO lines per checkpoint through absl, tensorflow-datasets
prints its preparation banners and progress bars, and JAX reports the
backends it did not find. `setup` (called by each entry point's `main`, never
at import) keeps on the console:

* unet_jax's own INFO lines (a config summary, one line per log step or the
  progress bar on a terminal, one per evaluation, the final table, where
  things were written), without absl's prefix;
* every library message at WARNING or above, except the known harmless ones
  in `HARMLESS_WARNINGS`;

and sends everything, at INFO and above, to a log file when one is given.
`verbose=True` shows everything on the console as absl formats it.
"""

import logging as std_logging
import os
import pathlib

from absl import logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Entry points that live outside the package (benchmarks/, scripts/) count as ours too.
_OUR_DIRS = (_PACKAGE_DIR, os.path.join(os.path.dirname(_PACKAGE_DIR), 'benchmarks'),
             os.path.join(os.path.dirname(_PACKAGE_DIR), 'scripts'))

# Library warnings that say nothing a user can or should act on.
HARMLESS_WARNINGS = (
    'OpenCV is not installed',  # tfds: it decodes PNGs with PIL instead
    'Using custom data configuration',  # tfds: every local builder config
    'read_only=True, setting save_interval_steps',  # orbax: evaluate/predict only read
    'Given directory is read only',
)

# `logging.info(..., extra=FILE_ONLY)` goes to the log file, not the console.
FILE_ONLY = {'unet_jax_console': False}


def is_ours(record: std_logging.LogRecord) -> bool:
  return os.path.abspath(record.pathname).startswith(_OUR_DIRS)


class ConsoleFilter(std_logging.Filter):
  """Passes unet_jax's own INFO lines and the libraries' real warnings."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if not getattr(record, 'unet_jax_console', True):
      return False
    if record.levelno >= std_logging.WARNING:
      message = record.getMessage()
      return not any(text in message for text in HARMLESS_WARNINGS)
    return record.levelno >= std_logging.INFO and is_ours(record)


class ConsoleFormatter(std_logging.Formatter):
  """Own INFO lines as they are; warnings and errors with their level and origin."""

  def format(self, record: std_logging.LogRecord) -> str:
    message = record.getMessage()
    if record.levelno >= std_logging.WARNING:
      origin = 'unet_jax' if is_ours(record) else record.name
      return f'{record.levelname}: {message} [{origin}]'
    return message


_FILE_FORMAT = '%(asctime)s %(levelname).1s %(name)s %(filename)s:%(lineno)d] %(message)s'


def setup(log_file: str | os.PathLike | None = None, verbose: bool = False) -> None:
  """Quiets the console (unless `verbose`) and logs everything to `log_file`."""
  handler = logging.get_absl_handler()
  logging.set_verbosity(logging.INFO)
  for old in [f for f in handler.filters if isinstance(f, ConsoleFilter)]:
    handler.removeFilter(old)
  if not verbose:
    handler.addFilter(ConsoleFilter())
    handler.setFormatter(ConsoleFormatter())
    _quiet_tfds()
  if log_file is not None:
    add_log_file(log_file)


def add_log_file(log_file: str | os.PathLike) -> None:
  """Everything at INFO and above, from every library, appended to `log_file`."""
  path = pathlib.Path(log_file)
  root = std_logging.getLogger()
  if any(isinstance(h, std_logging.FileHandler) and h.baseFilename == str(path.absolute())
         for h in root.handlers):
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  file_handler = std_logging.FileHandler(path)
  file_handler.setLevel(std_logging.INFO)
  file_handler.setFormatter(std_logging.Formatter(_FILE_FORMAT))
  root.addHandler(file_handler)


def _quiet_tfds() -> None:
  """tensorflow-datasets' progress bars off (its banners are logged by the builder)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
