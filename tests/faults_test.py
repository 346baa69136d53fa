"""Faults never lose work: SIGKILL at any moment, a non-finite loss, an
unwritable or full workdir, out-of-range configs, and pickle-free restores."""

import json
import os
import pathlib
import pickle
import random
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, saved_params, tiny_config
from unet_jax import checkpointing
from unet_jax import config_checks
from unet_jax import input_pipeline
from unet_jax import train


def _command(data_dir, workdir):
  return [sys.executable, '-m', 'unet_jax.main', '--config=configs/synthetic.py:smoke',
          f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
          '--config.data.synthetic_scenes=0', '--config.data.split_key=name',
          '--config.data.validation_fraction=0.25', '--config.data.test_fraction=0.0',
          '--config.num_epochs=3', '--config.log_every_steps=1',
          '--config.checkpoint_every_steps=2', '--config.model.dropout_rate=0.3']


def _start(data_dir, workdir):
  """Starts training; its output goes to a file beside the workdir (a pipe
  nobody reads would fill up and block the process)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  log = open(f'{workdir}.log', 'a')  # pylint: disable=consider-using-with
  process = subprocess.Popen(_command(data_dir, workdir), cwd=REPO, env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  process.log_path = log.name
  log.close()
  return process


def _output(process):
  return pathlib.Path(process.log_path).read_text()[-3000:]



def _kill_when(process, condition, timeout=240.0):
  """SIGKILLs `process` as soon as `condition()` holds; False if it ended first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      return False
    if condition():
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
      return True
    time.sleep(0.002)
  os.killpg(process.pid, signal.SIGKILL)
  raise TimeoutError('training neither reached the kill point nor finished')


def _checkpoint_being_written(workdir):
  return any('tmp' in p.name for p in (workdir / 'checkpoints').glob('*')) if (
      workdir / 'checkpoints').is_dir() else False


def _logged_steps(workdir):
  path = workdir / 'metrics.jsonl'
  return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigkill_at_random_moments_resumes_to_the_uninterrupted_result(synthetic_dir, tmp_path):
  straight = subprocess.run(_command(synthetic_dir, tmp_path / 'straight'), cwd=REPO,
                            env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True,
                            text=True, timeout=300)
  assert straight.returncode == 0, straight.stderr[-3000:]

  workdir = tmp_path / 'killed'
  rng = random.Random(0)
  kills = []
  processes = []
  try:
    # Twice while a checkpoint is being written, twice at a random moment of a step.
    for moment in ('checkpoint write', 'step', 'checkpoint write', 'step'):
      process = _start(synthetic_dir, workdir)
      processes.append(process)
      if moment == 'checkpoint write':
        condition = lambda: _checkpoint_being_written(workdir)  # pylint: disable=cell-var-from-loop
      else:
        target = _logged_steps(workdir) + 1
        delay = rng.uniform(0.0, 0.3)
        condition = lambda: _logged_steps(workdir) >= target and (  # pylint: disable=cell-var-from-loop
            time.sleep(delay) or True)
      if _kill_when(process, condition):
        kills.append(moment)
      else:
        assert process.returncode == 0, _output(process)
    final = _start(synthetic_dir, workdir)
    processes.append(final)
    assert final.wait(timeout=300) == 0, _output(final)
  finally:
    for process in processes:
      if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

  assert kills.count('checkpoint write') >= 1 and len(kills) >= 3, kills
  assert not [p for p in (workdir / 'checkpoints').iterdir() if 'tmp' in p.name]
  step_straight, params_straight = saved_params(tmp_path / 'straight')
  step_killed, params_killed = saved_params(workdir)
  assert step_killed == step_straight
  np.testing.assert_allclose(params_killed, params_straight, rtol=0, atol=1e-6)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(synthetic_dir, tmp_path,
                                                                    monkeypatch):
  poison_from_step = 5
  create_datasets = input_pipeline.create_datasets

  def poisoned_datasets(config, mesh):
    datasets = create_datasets(config, mesh)
    data = datasets['train']
    clean_batches = data.train_batches

    def train_batches(epoch, first_step=0):
      for i, batch in enumerate(clean_batches(epoch, first_step)):
        step = epoch * data.steps_per_epoch + first_step + i + 1
        yield dict(batch, image=batch['image'] * jnp.nan) if step >= poison_from_step else batch

    data.train_batches = train_batches
    return datasets

  monkeypatch.setattr(input_pipeline, 'create_datasets', poisoned_datasets)
  config = tiny_config(synthetic_dir, num_epochs=3)  # checkpoints every 3 steps, logs every 2
  with pytest.raises(train.NonFiniteLossError, match=r'nan at step 5\b.*checkpoint, step 3, holds only finite'):
    train.train_and_evaluate(config, str(tmp_path))
  step, params = saved_params(tmp_path)
  assert step == 3
  assert np.all(np.isfinite(params))


def test_workdir_that_cannot_be_written_fails_before_training(synthetic_dir, tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  with pytest.raises(checkpointing.WorkdirError, match='a_file/run is not writable'):
    train.train_and_evaluate(tiny_config(synthetic_dir), str(blocker / 'run'))


def test_full_workdir_fails_before_training(synthetic_dir, tmp_path, monkeypatch):
  usage = type('Usage', (), {'total': 10 * 2**30, 'used': 10 * 2**30 - 2**20, 'free': 2**20})
  monkeypatch.setattr(checkpointing.shutil, 'disk_usage', lambda path: usage)
  started = []
  monkeypatch.setattr(input_pipeline, 'create_datasets', lambda *a: started.append(1))
  with pytest.raises(checkpointing.WorkdirError, match='has only 1 MiB free'):
    train.train_and_evaluate(tiny_config(synthetic_dir), str(tmp_path / 'run'))
  assert not started


@pytest.mark.parametrize('overrides, num_devices, message', [
    ({'learning_rate': -1e-3}, 1, 'learning_rate must be a finite number > 0'),
    ({'batch_size': 0}, 1, 'batch_size must be an integer >= 1'),
    ({'batch_size': 12}, 8, 'batch_size 12 is not divisible by the 8 devices'),
    ({'data.image_size': (38, 32)}, 1, r'data.image_size: .*height 38 \(nearest valid: 36 or 40'),
    ({'model.dropout_rate': 1.0}, 1, r'model.dropout_rate must be a finite number in \[0, 1\)'),
    ({'model.encoder_drop_path_rate': 0.1}, 1,
     r"model.encoder_drop_path_rate needs an EfficientNet encoder \(model.encoder one of "
     r"\('efficientnet_lite0', 'efficientnet_lite1', 'efficientnet_lite2'\)\)"),
    ({'model.global_context_filters': 16}, 1,
     "model.global_context_filters needs an EfficientNet encoder"),
    ({'model.encoder': 'efficientnet_lite3'}, 1,
     "model.encoder must be one of 'unet', 'efficientnet_lite0', 'efficientnet_lite1', "
     "'efficientnet_lite2', got 'efficientnet_lite3'"),
    ({'model.global_context_filters': -1}, 1,
     'model.global_context_filters must be an integer >= 0'),
    ({'model.deep_supervision': 0.5}, 1,
     'model.deep_supervision needs an EfficientNet encoder'),
    ({'model.deep_supervision': -0.5}, 1, 'model.deep_supervision must be a finite number >= 0'),
    ({'num_epochs': 0}, 1, 'num_epochs must be an integer >= 1'),
    ({'data.augment.rare_windows': 1.5}, 1,
     r'data.augment.rare_windows must be a finite number in \[0, 1\]'),
    ({'data.train_splits': ('train', 'test')}, 1,
     "data.train_splits names 'test', but data.test_fraction is 0"),
    ({'data.train_splits': ('validation',)}, 1,
     "data.train_splits must be distinct split names, 'train' among them"),
    ({'data.exclude_frames': ('000034', 11478)}, 1,
     r"data.exclude_frames must be distinct non-empty strings .*got \('000034', 11478\)"),
    ({'data.exclude_groups': ('000', '000')}, 1,
     r"data.exclude_groups must be distinct non-empty strings .*got \('000', '000'\)"),
    ({'eval_split': 'test'}, 1, "eval_split is 'test', but data.test_fraction is 0"),
    ({'inference.tta_scales': (1.0, 0.0)}, 1,
     'inference.tta_scales must be a tuple of finite numbers > 0, at least one'),
    ({'inference.eval_size': (480,)}, 1, 'inference.eval_size must be'),
    ({'model.padding': 'VALID', 'data.image_size': (44, 44), 'inference.eval_size': (48, 64)}, 1,
     r"inference.eval_size must be \(\) with model.padding='VALID'"),
    ({'model.padding': 'VALID', 'data.image_size': (44, 44), 'inference.tta_scales': (1.0, 1.5)},
     1, r"inference.tta_scales must be \(1.0,\) with model.padding='VALID'"),
])
def test_out_of_range_config_is_a_clear_error(tmp_path, overrides, num_devices, message):
  config = tiny_config(tmp_path / 'data', **overrides)
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.check_config(config, num_devices=num_devices)


def test_named_validation_groups_count_as_a_validation_split(tmp_path):
  # Validation named by groups needs no validation fraction.
  config = tiny_config(tmp_path / 'data', **{'data.validation_fraction': 0.0,
                                             'data.validation_groups': ('000000', '000001'),
                                             'data.train_splits': ('train', 'validation')})
  config_checks.check_config(config, num_devices=1)
  config.data.validation_groups = ()
  with pytest.raises(config_checks.ConfigError, match="eval_split is 'validation', but"):
    config_checks.check_config(config, num_devices=1)


def test_invalid_config_fails_before_touching_the_workdir(tmp_path):
  config = tiny_config(tmp_path / 'data', learning_rate=-1.0)
  with pytest.raises(config_checks.ConfigError):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_checkpoints_restore_without_pickle(synthetic_dir, tmp_path, monkeypatch):
  train.train_and_evaluate(tiny_config(synthetic_dir, num_epochs=1), str(tmp_path))

  def refuse(*args, **kwargs):
    raise AssertionError('a checkpoint restore used pickle')

  monkeypatch.setattr(pickle, 'load', refuse)
  monkeypatch.setattr(pickle, 'loads', refuse)
  monkeypatch.setattr(pickle, 'Unpickler', refuse)
  _, params = saved_params(tmp_path)
  assert params.size > 0 and np.all(np.isfinite(params))


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_a_checkpoint_and_exit_cleanly(synthetic_dir, tmp_path, signum):
  workdir = tmp_path / 'run'
  process = _start(synthetic_dir, workdir)
  try:
    deadline = time.monotonic() + 240
    while _logged_steps(workdir) < 3 and time.monotonic() < deadline and process.poll() is None:
      time.sleep(0.01)
    assert process.poll() is None, 'training ended before the signal was sent'
    process.send_signal(signum)
    assert process.wait(timeout=120) == 0, _output(process)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
  logged = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  step, _ = saved_params(workdir)
  assert step == logged[-1]['step']  # saved where it stopped, not at the last periodic save
  assert logged[-1]['epoch'] < 3  # and it stopped before the end of its 3 epochs
