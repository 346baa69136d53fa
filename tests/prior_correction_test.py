"""Taking the class-weight prior out: by hand, the file training writes, and
evaluate and predict with it."""

import json
import math
import shutil

import ml_collections
import numpy as np
import pytest

from unet_jax import carla_files
from unet_jax import errors
from unet_jax import evaluate
from unet_jax import input_pipeline
from unet_jax import losses
from unet_jax import predict
from unet_jax import prior_correction
from unet_jax import sharding

ROAD = 7


def test_the_correction_by_hand():
  logits = np.array([[[[2.0, 1.0, 0.5]]]], np.float32)  # one pixel, three classes

  def apply_fn(variables, images, *, train=False):
    del variables, images, train
    return logits

  weights = np.array([1.0, math.e, 0.5])
  corrected = prior_correction.corrected(apply_fn, weights, 0.5)
  # 2 - 0.5 * log 1, 1 - 0.5 * log e, 0.5 - 0.5 * log 0.5
  expected = [2.0, 0.5, 0.5 + 0.5 * math.log(2.0)]
  np.testing.assert_allclose(np.asarray(corrected(None, None))[0, 0, 0], expected, rtol=1e-6)
  # Strong enough, the argmax moves to the class with the smallest weight.
  assert int(np.argmax(prior_correction.corrected(apply_fn, weights, 3.0)(None, None))) == 2
  assert prior_correction.corrected(apply_fn, weights, 0.0) is apply_fn


def test_the_strength_comes_from_the_flag_else_the_config():
  config = ml_collections.ConfigDict({'inference': {'prior_correction': 0.25}})
  assert prior_correction.strength(config) == 0.25
  assert prior_correction.strength(config, 0.0) == 0.0
  assert prior_correction.strength(ml_collections.ConfigDict({'model': {}})) == 0.0
  for bad in (-0.1, float('nan'), float('inf')):
    with pytest.raises(errors.UserError, match='prior_correction must be a finite number >= 0'):
      prior_correction.strength(config, bad)


def test_training_records_the_class_weights_it_used(trained):
  config = trained['config']
  train_data = input_pipeline.create_datasets(config, sharding.create_mesh())['train']
  expected = losses.class_weights_from_counts(
      train_data.class_pixel_counts(), config.class_weighting, config.class_weight_max)
  recorded = json.loads((trained['workdir'] / prior_correction.WEIGHTS_FILE).read_text())
  assert recorded['class_weighting'] == config.class_weighting == 'median'
  assert len(set(np.round(expected, 6))) > 2  # weights that differ, or the check proves little
  np.testing.assert_allclose(recorded['weights'], np.asarray(expected), rtol=1e-6)
  np.testing.assert_allclose(prior_correction.load(str(trained['workdir']), 23),
                             np.asarray(expected), rtol=1e-6)


@pytest.mark.parametrize('content, problem', [
    (None, 'does not exist: the run was trained before'),
    ('{"weights": [1.0, 2.0]}', 'expected 23 finite weights > 0'),
    ('{"weights": ' + json.dumps([1.0] * 22 + [0.0]) + '}', 'expected 23 finite weights > 0'),
    ('not json', 'is not a class-weights file'),
    ('{"weight": []}', 'is not a class-weights file'),
])
def test_a_missing_or_bad_weights_file_is_one_clear_error(tmp_path, content, problem):
  if content is not None:
    (tmp_path / prior_correction.WEIGHTS_FILE).write_text(content)
  with pytest.raises(errors.UserError, match=problem) as error:
    prior_correction.load(str(tmp_path), 23)
  assert str(tmp_path / prior_correction.WEIGHTS_FILE) in str(error.value)


def _workdir_with_road_weight(trained, tmp_path, road_weight):
  """A copy of the trained workdir whose recorded weights are 1 but Road's."""
  workdir = tmp_path / 'workdir'
  shutil.copytree(trained['workdir'], workdir)
  weights = [1.0] * 23
  weights[ROAD] = road_weight
  (workdir / prior_correction.WEIGHTS_FILE).write_text(json.dumps({'weights': weights}))
  return workdir


def test_evaluate_takes_the_prior_out(trained, tmp_path):
  # A tiny Road weight taken out at full strength adds 69 to Road's
  # log-probability: every pixel becomes Road.
  workdir = _workdir_with_road_weight(trained, tmp_path, 1e-30)
  summary, out_dir = evaluate.evaluate_workdir(str(workdir), 'test', 'latest', num_images=1,
                                               prior_strength=1.0)
  confusion = np.asarray(summary['confusion_matrix'])
  assert confusion[:, ROAD].sum() == confusion.sum() > 0
  assert summary['pixel_accuracy'] == pytest.approx(confusion[ROAD].sum() / confusion.sum())
  record = json.loads((out_dir / 'metrics.json').read_text())
  assert record['prior_correction'] == 1.0
  assert 'Class-weight prior taken out at strength 1' in (out_dir / 'report.md').read_text()
  # Without it the same checkpoint predicts more than Road.
  plain, _ = evaluate.evaluate_workdir(str(workdir), 'test', 'latest', num_images=0,
                                       prior_strength=0.0)
  assert np.asarray(plain['confusion_matrix'])[:, ROAD].sum() < confusion.sum()


def test_evaluate_without_the_weights_file_says_so(trained, tmp_path):
  workdir = tmp_path / 'workdir'
  shutil.copytree(trained['workdir'], workdir)
  (workdir / prior_correction.WEIGHTS_FILE).unlink()
  shutil.rmtree(workdir / 'eval', ignore_errors=True)  # reports other tests left
  with pytest.raises(errors.UserError, match='class_weights.json does not exist'):
    evaluate.evaluate_workdir(str(workdir), 'test', 'latest', num_images=0, prior_strength=0.5)
  assert not (workdir / 'eval').exists()


def test_predict_takes_the_prior_out(trained, tmp_path):
  workdir = _workdir_with_road_weight(trained, tmp_path, 1e-30)
  inputs = tmp_path / 'in'
  inputs.mkdir()
  frame = sorted((trained['data_dir'] / carla_files.IMAGE_DIR).glob('*.png'))[0]
  shutil.copy(frame, inputs / 'frame.png')
  run = predict.predict_files(str(workdir), str(inputs), str(tmp_path / 'out'),
                              checkpoint='latest', prior_strength=1.0)
  assert run.written == [inputs / 'frame.png'] and not run.failed
  _, mask = carla_files.read_pair(carla_files.Pair('frame', inputs / 'frame.png',
                                                   tmp_path / 'out' / 'frame_mask.png'))
  assert np.all(mask == ROAD)
  predict.predict_files(str(workdir), str(inputs), str(tmp_path / 'plain'), checkpoint='latest',
                        prior_strength=0.0)
  _, plain = carla_files.read_pair(carla_files.Pair('frame', inputs / 'frame.png',
                                                    tmp_path / 'plain' / 'frame_mask.png'))
  assert len(np.unique(plain)) > 1
