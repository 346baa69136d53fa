"""What every command does around its work: known errors as one line.

`cli.run(main)` replaces `absl.app.run(main)` and gives every command the
flag `--verbose`. A `errors.UserError` (bad data, bad config, bad workdir or
checkpoint) prints `error: <message>` on stderr and exits with status 1; with
`--verbose` (or absl's `--verbosity=1`) the traceback comes first. Any other
exception is a bug and keeps its traceback. (`--verbose` also shows every
library's log lines: `unet_jax.console`.)
"""

import functools
import sys
import traceback

from absl import app
from absl import flags

from unet_jax import errors

EXIT_USER_ERROR = 1


def _drop_closed_loop_callbacks(previous):
  """An unraisable hook that drops the callbacks TensorStore delivers after an
  Orbax read failed and its event loop closed; everything else goes on to `previous`."""

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
      return
    previous(unraisable)

  return hook


def report(error: BaseException, show_traceback: bool = False) -> None:
  """Prints a known error as `error: ...` (its traceback first if asked)."""
  if show_traceback:
    traceback.print_exception(error)
  sys.stdout.flush()
  print(f'error: {error}', file=sys.stderr, flush=True)


def _guarded(main, argv):
  try:
    return main(argv)
  except errors.UserError as error:
    report(error, show_traceback=verbose())
    raise SystemExit(EXIT_USER_ERROR) from None


def verbose() -> bool:
  """Whether the command runs with --verbose (or absl's --verbosity >= 1)."""
  values = flags.FLAGS
  return bool(('verbose' in values and values.verbose) or values.verbosity >= 1)


def run(main) -> None:
  """`app.run(main)`, with known errors printed as one line and exit status 1."""
  if 'verbose' not in flags.FLAGS:
    flags.DEFINE_bool('verbose', False, "Show every library's log lines on the console, and "
                      'the traceback of a known error.')
  sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)
  app.run(functools.partial(_guarded, main))
