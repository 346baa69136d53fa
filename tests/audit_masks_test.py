"""scripts/audit_masks.py: frames whose mask belongs to another frame."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from unet_jax import carla_files
from unet_jax import errors

_spec = importlib.util.spec_from_file_location('audit_masks', REPO / 'scripts' / 'audit_masks.py')
audit_masks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(audit_masks)


def test_agreements_by_hand():
  prediction = np.array([[1, 2], [3, 4]])
  masks = np.array([[[1, 2], [3, 4]],    # all 4 pixels
                    [[1, 2], [0, 0]],    # 2 of 4
                    [[0, 0], [0, 4]]])   # 1 of 4
  np.testing.assert_allclose(audit_masks.agreements(prediction, masks), [1.0, 0.5, 0.25])


def _scene(kind: int, shape=(8, 10)) -> np.ndarray:
  """Two scenes: road below sky (kind 0), or the same with a building of 16 pixels (kind 1)."""
  mask = np.full(shape, 13)  # Sky
  mask[4:] = 7  # Road
  if kind:
    mask[:4, 6:] = 1  # Building
  return mask


def test_a_mask_of_the_other_scene_is_listed_and_no_other_frame():
  # Recording 000: frames 000000..000003 show scene 0, 000004..000006 scene 1,
  # and 000002 carries a mask of scene 1. The model is right except one pixel everywhere.
  truth = {f'000{i:03d}': _scene(int(i >= 4)) for i in range(7)}
  masks = dict(truth, **{'000002': _scene(1)})
  predictions = {}
  for name, mask in truth.items():
    predictions[name] = mask.copy()
    predictions[name][7, 0] = 0  # one pixel wrong under any mask
  records = audit_masks.audit(predictions, masks, margin=0.03)
  by_frame = {r['frame']: r for r in records}
  listed = [r['frame'] for r in records if r['misplaced']]
  assert listed == ['000002']
  bad = by_frame['000002']
  # Own mask: 16 building pixels + the wrong one of 80; a scene-0 mask: only the wrong one.
  assert bad['own'] == pytest.approx(63 / 80)
  assert bad['best_other_agreement'] == pytest.approx(79 / 80)
  assert bad['best_other'] in {'000000', '000001', '000003'}
  assert bad['margin'] == pytest.approx(16 / 80)
  assert records[0]['frame'] == '000002'  # the largest margin first
  for name in truth.keys() - {'000002'}:
    assert by_frame[name]['margin'] <= 0


def test_only_masks_of_the_same_recording_are_compared():
  # 001000's mask is wrong, and the only mask that fits it is in recording 002.
  masks = {'001000': _scene(1), '001001': _scene(1), '002000': _scene(0)}
  predictions = {'001000': _scene(0), '001001': _scene(1), '002000': _scene(0)}
  records = {r['frame']: r for r in audit_masks.audit(predictions, masks, margin=0.03)}
  assert not any(r['misplaced'] for r in records.values())
  assert records['001000']['best_other'] == '001001'
  # Alone in its recording: nothing to compare with.
  assert records['002000']['best_other'] is None and records['002000']['margin'] == 0.0
  # Frame by frame (split_key='name') no frame has another to compare with.
  by_name = audit_masks.audit(predictions, masks, margin=0.03, split_key='name')
  assert all(r['best_other'] is None for r in by_name)


def test_the_margin_decides():
  masks = {'000000': _scene(0), '000001': _scene(1)}
  predictions = {'000000': _scene(1), '000001': _scene(1)}  # 000000's own mask misses 16 of 80
  assert [r['frame'] for r in audit_masks.audit(predictions, masks, 0.1) if r['misplaced']] == [
      '000000']
  assert not any(r['misplaced'] for r in audit_masks.audit(predictions, masks, 0.25))


def _folder(root, masks: dict, predictions: dict):
  for sub in ('CameraRGB', 'CameraMask'):
    (root / 'data' / sub).mkdir(parents=True, exist_ok=True)
  (root / 'predictions').mkdir(exist_ok=True)
  for name, mask in masks.items():
    image = np.zeros(mask.shape + (3,), np.uint8)
    carla_files.write_image(root / 'data' / 'CameraRGB' / f'{name}.png', image)
    carla_files.write_mask(root / 'data' / 'CameraMask' / f'{name}.png', mask)
  for name, prediction in predictions.items():
    carla_files.write_mask(root / 'predictions' / f'{name}_mask.png', prediction)
  return root / 'data', root / 'predictions'


def test_files_on_a_grid(tmp_path):
  masks = {'000000': _scene(0, (16, 20)), '000001': _scene(1, (16, 20))}
  data_dir, predictions_dir = _folder(tmp_path, masks, masks)
  predictions, loaded = audit_masks.load(data_dir, predictions_dir, stride=2)
  assert loaded['000001'].shape == (8, 10)
  np.testing.assert_array_equal(loaded['000001'], masks['000001'][::2, ::2])
  np.testing.assert_array_equal(predictions['000000'], masks['000000'][::2, ::2])


def test_a_missing_or_mis_sized_prediction_names_the_file(tmp_path):
  masks = {'000000': _scene(0), '000001': _scene(1)}
  data_dir, predictions_dir = _folder(tmp_path, masks, {'000000': _scene(0)})
  with pytest.raises(errors.UserError, match=r'000001_mask\.png: missing'):
    audit_masks.load(data_dir, predictions_dir, stride=1)
  carla_files.write_mask(predictions_dir / '000001_mask.png', _scene(1, (4, 5)))
  with pytest.raises(errors.UserError, match=r'000001_mask\.png: 5x4 pixels, but its mask .* 10x8'):
    audit_masks.load(data_dir, predictions_dir, stride=1)


def test_command_lists_the_frame_and_writes_json(tmp_path):
  truth = {f'000{i:03d}': _scene(int(i >= 2)) for i in range(4)}
  masks = dict(truth, **{'000003': _scene(0)})
  data_dir, predictions_dir = _folder(tmp_path, masks, truth)
  out = tmp_path / 'audit.json'
  command = [sys.executable, str(REPO / 'scripts' / 'audit_masks.py'), f'--data_dir={data_dir}',
             f'--predictions={predictions_dir}', '--stride=1', f'--json={out}']
  result = subprocess.run(command, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith('1 of 4 frames')
  assert '000003: own mask 0.800, mask of 000002 1.000 (+0.200)' in result.stdout
  assert "--config.data.exclude_frames=\"('000003',)\"" in result.stdout
  records = json.loads(out.read_text())
  assert [r['frame'] for r in records if r['misplaced']] == ['000003']
  # A folder of predictions that does not exist: one line, status 1.
  result = subprocess.run(command[:3] + [f'--predictions={tmp_path / "none"}'],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(f'error: {tmp_path / "none"}: no such')
  assert 'Traceback' not in result.stderr
