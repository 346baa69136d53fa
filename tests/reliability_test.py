"""Every failure is one clear error, and nothing saved is ever damaged (one
test per fault; the command-line version of each is in cli_faults_test.py)."""

import io
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from conftest import REPO, tiny_config
from unet_jax import carla_files
from unet_jax import checkpointing
from unet_jax import config_checks
from unet_jax import evaluate
from unet_jax import predict
from unet_jax import synthetic
from unet_jax import train




def _copy_workdir(trained, tmp_path) -> pathlib.Path:
  workdir = tmp_path / 'workdir'
  shutil.copytree(trained['workdir'], workdir)
  return workdir


def _garble(checkpoint: pathlib.Path) -> None:
  """Overwrites every array data file of a checkpoint, as a disk fault would."""
  files = [p for p in checkpoint.rglob('*') if p.is_file() and p.parent.name == 'd']
  assert files
  for path in files:
    path.write_bytes(b'\x00not an array' * 8)


def _png(array, mode=None, palette=None) -> bytes:
  image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
  if palette is not None:
    image.putpalette(palette)
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  return buffer.getvalue()


# ---- 1. masks are read by the colour a viewer shows ----


def test_palette_mask_is_read_by_its_shown_red_not_its_palette_indices():
  classes_shown = np.array([[7, 1, 0], [3, 7, 22]], np.uint8)
  # Palette entry i shows red (i * 5) % 23 + ... : a non-identity palette, as
  # lossless optimisers produce from the RGBA masks.
  order = np.array([22, 7, 3, 1, 0], np.uint8)
  indices = np.searchsorted(order, classes_shown, sorter=np.argsort(order))
  indices = np.argsort(order)[indices].astype(np.uint8)
  palette = np.zeros((256, 3), np.uint8)
  palette[:len(order), 0] = order
  data = _png(indices, 'P', palette.ravel().tolist())
  assert Image.open(io.BytesIO(data)).mode == 'P'
  np.testing.assert_array_equal(carla_files.decode_mask(data, 'm.png'), classes_shown)


def test_grayscale_alpha_and_16_bit_masks_follow_the_same_rule():
  mask = np.array([[0, 5], [22, 9]], np.uint8)
  grey_alpha = Image.fromarray(mask).convert('LA')
  buffer = io.BytesIO()
  grey_alpha.save(buffer, format='PNG')
  assert Image.open(io.BytesIO(buffer.getvalue())).mode == 'LA'
  np.testing.assert_array_equal(carla_files.decode_mask(buffer.getvalue()), mask)
  scaled = _png(mask.astype(np.uint16) * 257)
  assert Image.open(io.BytesIO(scaled)).mode.startswith('I')
  np.testing.assert_array_equal(carla_files.decode_mask(scaled), mask)
  with pytest.raises(carla_files.BadDataError, match=r'm16.png: 16-bit grayscale mask holds 5'):
    carla_files.decode_mask(_png(mask.astype(np.uint16)), 'm16.png')


# ---- 2. a non-finite state is never saved ----


def test_a_state_gone_non_finite_with_a_finite_loss_is_never_saved(synthetic_dir, tmp_path,
                                                                    monkeypatch):
  # From step 5 on, the batch-norm statistics are inf while the loss (computed
  # from batch statistics in training mode) stays finite: what a diverging
  # learning rate does first.
  step_fn = train.train_step

  def poisoned_step(state, batch, dropout_key, **kwargs):
    new_state, metrics = step_fn(state, batch, dropout_key, **kwargs)
    bad = new_state.step >= 5
    stats = jax.tree.map(lambda x: jnp.where(bad, jnp.inf, x), new_state.batch_stats)
    return new_state.replace(batch_stats=stats), metrics

  monkeypatch.setattr(train, 'train_step', poisoned_step)
  config = tiny_config(synthetic_dir, num_epochs=3)  # checkpoints every 3 steps, logs every 2
  with pytest.raises(train.NonFiniteLossError,
                     match=r'statistics or optimizer moments became inf or NaN at step 5\b.*'
                           r'checkpoint, step 3, holds only finite values'):
    train.train_and_evaluate(config, str(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir())
  assert steps == [3]
  _, variables, _ = checkpointing.restore_model(str(tmp_path), 'latest')
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))


# ---- 3. a corrupt checkpoint is named; resuming skips it ----


def test_a_corrupt_checkpoint_is_named_with_the_other_steps(trained, tmp_path):
  workdir = _copy_workdir(trained, tmp_path)
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir())
  _garble(workdir / 'checkpoints' / str(steps[-1]))
  with pytest.raises(checkpointing.WorkdirError,
                     match=re.escape(f'checkpoint {workdir}/checkpoints/{steps[-1]} cannot be read')
                     + '.*' + re.escape(f'other saved steps: {steps[:-1]}')):
    checkpointing.restore_model(str(workdir), 'latest')
  # The others still restore.
  _, _, step = checkpointing.restore_model(str(workdir), str(steps[0]))
  assert step == steps[0]


def test_resuming_falls_back_to_the_newest_checkpoint_that_reads(synthetic_dir, tmp_path,
                                                                 caplog):
  config = tiny_config(synthetic_dir, num_epochs=1)
  train.train_and_evaluate(config, str(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir())
  assert len(steps) >= 2
  _garble(tmp_path / 'checkpoints' / str(steps[-1]))
  config.num_epochs = 2
  with caplog.at_level('WARNING'):
    result = train.train_and_evaluate(config, str(tmp_path))
  warnings = [r.getMessage() for r in caplog.records if 'cannot be read' in r.getMessage()]
  assert len(warnings) == 1 and f'checkpoint {steps[-1]} cannot be read' in warnings[0]
  assert (tmp_path / checkpointing.UNREADABLE_DIR / str(steps[-1])).is_dir()  # kept, aside
  assert result['step'] == 2 * steps[-1]
  _, variables, step = checkpointing.restore_model(str(tmp_path), 'latest')
  assert step == result['step']


# ---- 4. nothing written where it cannot or must not be ----


def test_an_unwritable_report_folder_fails_before_scoring(trained, tmp_path, monkeypatch):
  workdir = _copy_workdir(trained, tmp_path)
  shutil.rmtree(workdir / 'eval', ignore_errors=True)
  (workdir / 'eval').write_text('a file where the report folder goes')
  scored = []
  monkeypatch.setattr(evaluate, 'load_split', lambda *a: scored.append(1))
  with pytest.raises(checkpointing.WorkdirError, match=r'report folder .*/eval is not writable'):
    evaluate.evaluate_workdir(str(workdir), checkpoint='latest')
  assert not scored


# ---- 6. the config is checked, all of it, before anything ----


@pytest.mark.parametrize('overrides, message', [
    ({'class_weighting': 'foo'}, "class_weighting must be one of 'none', 'inverse', 'median'"),
    ({'optimizer': 'adagrad'}, "optimizer must be one of 'adam', 'adamw', 'sgd'"),
    ({'lr_schedule': 'step'}, "lr_schedule must be one of 'constant', 'cosine'"),
    ({'data.device_cache': 'yes'}, "data.device_cache must be one of 'auto', 'always', 'never'"),
    ({'data.split_key': 'frame'}, "data.split_key must be one of 'recording', 'name'"),
    ({'data.image_size': (32, 32, 32, 32)}, r'data.image_size must be a pair of values, each an '
                                            r'integer >= 1, got \(32, 32, 32, 32\)'),
    ({'data.image_size': (32, 0)}, 'data.image_size must be a pair'),
    ({'learning_rate': float('inf')}, 'learning_rate must be a finite number > 0, got inf'),
    ({'learning_rate': float('nan')}, 'learning_rate must be a finite number > 0, got nan'),
    ({'model.padding': 'same'}, "model.padding must be one of 'SAME', 'VALID'"),
    ({'data.validation_fraction': 0.6, 'data.test_fraction': 0.5},
     r'validation_fraction \+ data.test_fraction must be < 1'),
    ({'distributed': 'maybe'}, 'distributed must be one of'),
    ({'data.validation_groups': ('001', '001')},
     r'data.validation_groups must be distinct non-empty strings'),
    ({'data.validation_groups': ('001', '')},
     r"data.validation_groups must be .* got \('001', ''\)"),
])
def test_every_field_is_checked_before_the_workdir_or_data_is_touched(tmp_path, overrides,
                                                                      message):
  data_dir = tmp_path / 'data'
  config = tiny_config(data_dir, **overrides)
  with pytest.raises(config_checks.ConfigError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists() and not data_dir.exists()


def test_every_config_field_of_every_config_has_a_rule():
  from configs import carla  # pylint: disable=g-import-not-at-top
  config = carla.get_config()
  paths = []

  def walk(node, prefix):
    for key, value in node.items():
      if hasattr(value, 'items'):
        walk(value, f'{prefix}{key}.')
      else:
        paths.append(prefix + key)

  walk(config, '')
  assert sorted(set(paths) - set(config_checks.RULES)) == []


# ---- 7. what used to be skipped without a word ----


@pytest.mark.parametrize('fault, message', [
    ('dangling', 'CameraRGB/zz_link.png: dangling link to'),
    ('loop', 'CameraMask/zz_loop.png: symbolic link loop'),
    ('tiny', r'CameraRGB/000001.png: image of 1x1 pixels is too small'),
])
def test_links_that_lead_nowhere_and_tiny_frames_are_reported(tmp_path, fault, message):
  synthetic.write_scenes(tmp_path, 4, seed=0, size=(32, 48))
  if fault == 'dangling':
    (tmp_path / 'CameraRGB' / 'zz_link.png').symlink_to(tmp_path / 'nowhere.png')
  elif fault == 'loop':
    (tmp_path / 'CameraMask' / 'zz_loop.png').symlink_to(tmp_path / 'CameraMask' / 'zz_loop.png')
  else:
    carla_files.write_image(tmp_path / 'CameraRGB' / '000001.png', np.zeros((1, 1, 3), np.uint8))
    carla_files.write_mask(tmp_path / 'CameraMask' / '000001.png', np.zeros((1, 1), np.uint8))
  with pytest.raises(carla_files.BadDataError, match=message):
    carla_files.validate_pairs(tmp_path)
  assert len(carla_files.validate_pairs(tmp_path, skip_bad_pairs=True)) == 3 + (fault != 'tiny')


def test_the_bad_data_hint_names_what_evaluate_takes(trained, tmp_path):
  folder = tmp_path / 'frames'
  synthetic.write_scenes(folder, 4, seed=0, size=(40, 56))
  (folder / 'CameraMask' / '000002.png').write_bytes(b'')
  with pytest.raises(carla_files.BadDataError, match='000002.png: empty file.*--skip_bad_pairs'):
    evaluate.evaluate_workdir(str(_copy_workdir(trained, tmp_path)), checkpoint='latest',
                              data_dir=str(folder))
  summary, _ = evaluate.evaluate_workdir(str(trained['workdir']), checkpoint='latest',
                                         data_dir=str(folder), num_images=0, skip_bad_pairs=True)
  assert summary['step'] == trained['final']['step']


# ---- 8. predict leaves nothing behind when it cannot start ----


def test_predict_without_a_checkpoint_creates_no_output_folder(trained, tmp_path):
  workdir = _copy_workdir(trained, tmp_path)
  shutil.rmtree(workdir / 'checkpoints')
  image = tmp_path / 'in.png'
  carla_files.write_image(image, np.zeros((20, 20, 3), np.uint8))
  with pytest.raises(checkpointing.WorkdirError, match='holds no checkpoint'):
    predict.predict_files(str(workdir), str(image), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


# ---- inference does not need training ----


def test_evaluate_and_predict_run_without_the_training_module(trained, tmp_path):
  """Imports and restores with `unet_jax.train` unavailable: inference builds no optimizer."""
  code = f'''
import sys
sys.modules['unet_jax.train'] = None  # any import of it fails
from unet_jax import evaluate, predict, checkpointing
config, variables, step = checkpointing.restore_model({str(trained['workdir'])!r}, 'latest')
assert set(variables) == {{'params', 'batch_stats'}}, variables.keys()
run = predict.predict_files({str(trained['workdir'])!r}, {str(tmp_path / 'in.png')!r},
                            {str(tmp_path / 'out')!r}, checkpoint='latest')
assert len(run.written) == 1
print('step', step)
'''
  carla_files.write_image(tmp_path / 'in.png', np.zeros((24, 30, 3), np.uint8))
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO)),
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'step {trained["final"]["step"]}' in result.stdout
