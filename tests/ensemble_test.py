"""Ensembles: the averaged probabilities by hand, which models may join, and
evaluate and predict with several workdirs."""

import json
import math
import shutil

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import trained_config
from unet_jax import carla_files
from unet_jax import checkpointing
from unet_jax import ensemble
from unet_jax import errors
from unet_jax import evaluate
from unet_jax import models
from unet_jax import predict
from unet_jax import preprocessing
from unet_jax import synthetic


def _constant_model(logits):
  """An apply function predicting the same logits at every pixel, scaled by its variables."""
  logits = jnp.asarray(logits, jnp.float32)

  def apply(variables, images, *, train=False):
    del train
    return jnp.broadcast_to(variables['scale'] * logits, (*images.shape[:3], logits.shape[0]))
  return apply


def test_two_models_average_their_probabilities_by_hand():
  # Model a: logits (log 3, 0) -> probabilities (3/4, 1/4); model b: (0, log 4) -> (1/5, 4/5).
  a = _constant_model([math.log(3.0), 0.0])
  b = _constant_model([0.0, math.log(4.0)])
  images = jnp.zeros((2, 3, 5, 3))
  out = ensemble.average([a, b])(({'scale': 1.0}, {'scale': 1.0}), images)
  assert out.shape == (2, 3, 5, 2)
  # Mean (3/4 + 1/5, 1/4 + 4/5) / 2 = (0.475, 0.525): class 1, which model a put first.
  np.testing.assert_allclose(np.exp(np.asarray(out[0, 0, 0])), [0.475, 0.525], rtol=1e-6)
  assert np.all(np.argmax(np.asarray(out), -1) == 1)
  # Each model reads its own variables: b at scale 0 is uniform, (0.75 + 0.5, 0.25 + 0.5) / 2.
  out = ensemble.average([a, b])(({'scale': 1.0}, {'scale': 0.0}), images)
  np.testing.assert_allclose(np.exp(np.asarray(out[1, 2, 4])), [0.625, 0.375], rtol=1e-6)


def test_one_model_is_returned_untouched():
  a = _constant_model([2.0, -1.0, 0.5])
  images = jnp.zeros((1, 2, 2, 3))
  alone = a({'scale': 1.0}, images)
  out = ensemble.average([a])(({'scale': 1.0},), images)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(alone))  # logits, not log-softmax


def test_variables_must_match_the_models():
  a = _constant_model([0.0, 1.0])
  with pytest.raises(ValueError, match='2 sets of variables for 1 models'):
    ensemble.average([a])(({'scale': 1.0}, {'scale': 1.0}), jnp.zeros((1, 2, 2, 3)))
  with pytest.raises(ValueError, match='at least one model'):
    ensemble.average([])


def _member(workdir, **changes):
  config = ml_collections.ConfigDict({
      'ignore_label': 255,
      'model': {'num_classes': 23, 'padding': 'SAME', 'depth': 4},
      'data': {'data_dir': '/data/carla', 'image_size': (256, 320), 'split_key': 'recording',
               'validation_fraction': 0.5, 'test_fraction': 0.0, 'validation_groups': (),
               'synthetic_scenes': 0, 'train_splits': ('train',)},
  })
  for key, value in changes.items():
    target = config
    *parents, leaf = key.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return ensemble.Member(workdir, config, {}, 100, None)


def test_models_that_cannot_be_averaged_are_refused_by_name():
  first = _member('/runs/a')
  ensemble.check([first, _member('/runs/b'), _member('/runs/c', **{'data.image_size': (96, 128)})],
                 'validation')  # SAME models of other sizes average
  for changes, message in (({'model.num_classes': 12}, 'model.num_classes is 12 against 23'),
                           ({'ignore_label': 0}, 'ignore_label is 0 against 255'),
                           ({'model.padding': 'VALID'}, "model.padding is 'VALID' against 'SAME'")):
    with pytest.raises(errors.UserError, match='/runs/b: ' + message):
      ensemble.check([first, _member('/runs/b', **changes)])
  valid = _member('/runs/a', **{'model.padding': 'VALID'})
  with pytest.raises(errors.UserError, match='/runs/b: model.depth is 3 against 4'):
    ensemble.check([valid, _member('/runs/b', **{'model.padding': 'VALID', 'model.depth': 3})])
  with pytest.raises(errors.UserError, match='names a workdir twice'):
    ensemble.check([first, _member('/runs/b'), _member('/runs/a')])


def test_a_model_that_trained_on_the_scored_frames_is_refused():
  first = _member('/runs/a')
  other_split = _member('/runs/b', **{'data.validation_fraction': 0.3})
  with pytest.raises(errors.UserError,
                     match=r'/runs/b: trained on another split .*data.validation_fraction'):
    ensemble.check([first, other_split], 'validation')
  ensemble.check([first, other_split], None)  # a folder: none of the splits matter
  on_validation = _member('/runs/b', **{'data.train_splits': ('train', 'validation')})
  with pytest.raises(errors.UserError,
                     match=r'/runs/b: trained on another split .*data.train_splits'):
    ensemble.check([first, on_validation], 'validation')
  # Models trained on the validation recordings too are scored as one of them alone is:
  # the figures are not held out, as training says, but nothing is refused.
  ensemble.check([on_validation], 'validation')
  ensemble.check([on_validation,
                  _member('/runs/c', **{'data.train_splits': ('validation', 'train')})],
                 'validation')


def test_each_ensemble_has_its_own_report_tag():
  a, b, c = _member('/runs/a'), _member('/runs/b'), _member('/runs/c')
  assert ensemble.tag([a]) == ''
  tags = {ensemble.tag(m) for m in ([a, b], [a, c], [a, b, c], [b, a])}
  assert len(tags) == 4
  assert ensemble.tag([a, b, c]).startswith('-ensemble3_') and len(ensemble.tag([a, b, c])) == 19
  assert ensemble.parse_workdirs(' x, ,y ') == ['x', 'y'] and ensemble.parse_workdirs(None) == []


# --------------------------------------------------------------------------
# The commands, with the tiny trained workdir and a second run of another seed.

@pytest.fixture(scope='module')
def second_run(trained, tmp_path_factory):
  """The shared tiny run's config and frames trained again with seed 1."""
  from unet_jax import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('second_run') / 'workdir'
  config = trained_config(trained['data_dir'])
  config.seed = 1
  train.train_and_evaluate(config, str(workdir))
  return workdir


def _probabilities(workdir, image):
  config, variables, _ = checkpointing.restore_model(str(workdir), 'latest')
  resized, _ = preprocessing.resize_pair(image, np.zeros(image.shape[:2], np.uint8),
                                          config.data.image_size)
  logits = models.unet_from_config(config.model).apply(
      variables, resized[None].astype(np.float32) / 255.0, train=False)
  logits = np.asarray(logits[0], np.float64)
  exp = np.exp(logits - logits.max(-1, keepdims=True))
  return exp / exp.sum(-1, keepdims=True)


def test_predict_writes_the_argmax_of_the_averaged_probabilities(trained, second_run, tmp_path):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  image, _ = synthetic.render_scene((5, 0), 0, (45, 61))
  carla_files.write_image(inputs / 'frame.png', image)
  run = predict.predict_files(str(trained['workdir']), str(inputs), str(tmp_path / 'out'),
                              checkpoint='latest', ensemble_workdirs=[str(second_run)])
  assert run.written == [inputs / 'frame.png'] and not run.failed
  first, second = (_probabilities(w, image) for w in (trained['workdir'], second_run))
  assert np.any(first.argmax(-1) != second.argmax(-1))  # two models that disagree somewhere
  expected = predict.restore_size(((first + second) / 2).argmax(-1).astype(np.uint8), (45, 61))
  _, mask = carla_files.read_pair(carla_files.Pair('frame', inputs / 'frame.png',
                                                   tmp_path / 'out' / 'frame_mask.png'))
  np.testing.assert_array_equal(mask, expected)


def test_evaluate_scores_the_ensemble_into_its_own_report(trained, second_run, tmp_path):
  workdir = str(trained['workdir'])
  alone, alone_dir = evaluate.evaluate_workdir(workdir, 'validation', 'latest', num_images=1)
  # The same model twice (a copy under another path) predicts what it does alone.
  copy = tmp_path / 'copy'
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('eval'))
  twice, twice_dir = evaluate.evaluate_workdir(workdir, 'validation', 'latest', num_images=1,
                                               ensemble_workdirs=str(copy))
  np.testing.assert_array_equal(twice['confusion_matrix'], alone['confusion_matrix'])
  assert twice['loss'] == pytest.approx(alone['loss'], rel=1e-5)
  pair, pair_dir = evaluate.evaluate_workdir(workdir, 'validation', 'latest', num_images=1,
                                             ensemble_workdirs=[str(second_run)])
  assert pair['confusion_matrix'].sum() == alone['confusion_matrix'].sum()
  assert [m['workdir'] for m in pair['ensemble']] == [workdir, str(second_run)]
  assert len({alone_dir, twice_dir, pair_dir}) == 3
  assert pair_dir.name.startswith(f'{alone_dir.name}-ensemble2_')
  record = json.loads((pair_dir / 'metrics.json').read_text())
  assert record['ensemble'] == pair['ensemble']
  np.testing.assert_array_equal(record['confusion_matrix'], pair['confusion_matrix'])
  assert 'Ensemble of 2 models' in (pair_dir / 'report.md').read_text()
  assert 'ensemble' not in json.loads((alone_dir / 'metrics.json').read_text())
