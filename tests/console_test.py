"""The console shows unet_jax's own lines; libraries' chatter goes to the log file."""

import logging as std_logging
import os
import pathlib
import subprocess
import sys

from unet_jax import console
from unet_jax import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]


def _record(pathname: str, level: int, message: str, **extra) -> std_logging.LogRecord:
  record = std_logging.LogRecord('absl', level, pathname, 1, message, (), None)
  record.__dict__.update(extra)
  return record


def test_filter_keeps_own_info_and_library_warnings_only():
  ours = os.path.join(os.path.dirname(console.__file__), 'train.py')
  library = '/site-packages/orbax/checkpoint/checkpoint_manager.py'
  keep = console.ConsoleFilter().filter
  assert keep(_record(ours, std_logging.INFO, 'epoch 1: mean IoU 0.5'))
  assert not keep(_record(library, std_logging.INFO, 'Saving checkpoint at step 4'))
  assert keep(_record(library, std_logging.WARNING, 'disk almost full'))
  assert keep(_record(library, std_logging.ERROR, 'write failed'))
  assert not keep(_record(library, std_logging.WARNING, 'OpenCV is not installed. We ...'))
  assert not keep(_record(ours, std_logging.INFO, 'Config: ...', **console.FILE_ONLY))
  assert not keep(_record(ours, std_logging.DEBUG, 'details'))


def _train(synthetic_dir, workdir, *extra_flags) -> subprocess.CompletedProcess:
  command = [sys.executable, '-m', 'unet_jax.main', '--config=configs/synthetic.py:smoke',
             f'--workdir={workdir}', f'--config.data.data_dir={synthetic_dir}',
             '--config.data.synthetic_scenes=0', '--config.data.split_key=name',
             '--config.data.validation_fraction=0.25', '--config.data.test_fraction=0.0',
             f'--config.data.prepared_dir={workdir}/prepared', *extra_flags]
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  env.pop('XLA_FLAGS', None)  # (the tests' own process has set the defaults)
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True)


def test_a_tiny_training_run_prints_under_40_lines_and_logs_everything(synthetic_dir, tmp_path):
  result = _train(synthetic_dir, tmp_path / 'run')
  lines = (result.stdout + result.stderr).splitlines()
  text = '\n'.join(lines)
  assert len(lines) < 40, text
  assert 'orbax' not in text.lower() and 'Downloading and preparing' not in text, text
  assert 'libtpu' not in text and 'OpenCV' not in text, text
  assert 'mean IoU' in text and 'train_loss=' in text  # the run's own lines stay
  assert 'batch 4' in lines[0]  # the config, in one line
  log = (tmp_path / 'run' / 'train.log').read_text()
  assert 'orbax' in log.lower() and 'Config:' in log  # nothing is lost
  assert xla_flags.CPU_FLAGS[0] in log  # the entry point applied the default XLA flags


def test_console_scripts_name_each_command():
  import importlib  # pylint: disable=g-import-not-at-top
  import tomllib  # pylint: disable=g-import-not-at-top
  scripts = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['scripts']
  assert set(scripts) == {'unet-jax-train', 'unet-jax-evaluate', 'unet-jax-predict',
                          'unet-jax-export', 'unet-jax-synthetic'}
  for target in scripts.values():
    module, _, function = target.partition(':')
    entry = importlib.import_module(module)
    assert callable(getattr(entry, function)) and callable(entry.define_flags), target
