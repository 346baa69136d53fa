"""Test-time augmentation: identity is plain prediction; views averaged as written out by hand."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import carla_files
from unet_jax import checkpointing
from unet_jax import evaluate
from unet_jax import evaluation
from unet_jax import models
from unet_jax import predict
from unet_jax import sharding
from unet_jax import tta




@pytest.fixture(scope='module')
def tiny_model():
  model = models.UNet(num_classes=5, base_filters=4, depth=2)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  images = jnp.asarray(np.random.default_rng(0).random((2, 32, 48, 3)), jnp.float32)
  return model, variables, images


def _probabilities(logits):
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def test_identity_tta_is_the_model_exactly(tiny_model):
  model, variables, images = tiny_model
  plain = model.apply(variables, images, train=False)
  identity = tta.from_flags(model, flip=False, scales='1.0')(variables, images, train=False)
  np.testing.assert_array_equal(np.asarray(identity), np.asarray(plain))


def test_flip_averages_the_image_and_its_mirror(tiny_model):
  model, variables, images = tiny_model
  scores = tta.from_flags(model, flip=True, scales=[1.0])(variables, images)
  mirrored = model.apply(variables, images[:, :, ::-1], train=False)[:, :, ::-1]
  expected = (_probabilities(model.apply(variables, images, train=False))
              + _probabilities(mirrored)) / 2
  np.testing.assert_allclose(np.exp(np.asarray(scores)), np.asarray(expected), atol=1e-6)
  assert not np.allclose(np.asarray(mirrored), np.asarray(model.apply(variables, images)))


def test_scales_resize_views_and_probabilities_back(tiny_model):
  model, variables, images = tiny_model
  scores = tta.from_flags(model, flip=False, scales='1.0,0.5')(variables, images)
  assert scores.shape == (2, 32, 48, 5)
  half = jax.image.resize(images, (2, 16, 24, 3), 'linear')
  back = jax.image.resize(_probabilities(model.apply(variables, half)), (2, 32, 48, 5), 'linear')
  expected = (_probabilities(model.apply(variables, images)) + back) / 2
  np.testing.assert_allclose(np.exp(np.asarray(scores)), np.asarray(expected), atol=1e-6)


def test_model_size_scores_whole_frames_with_a_model_of_another_size(tiny_model):
  model, variables, images = tiny_model
  scores = tta.from_flags(model, False, '1.0', model_size=(16, 24))(variables, images)
  small = jax.image.resize(images, (2, 16, 24, 3), 'linear')
  expected = jax.image.resize(_probabilities(model.apply(variables, small)), (2, 32, 48, 5),
                              'linear')
  np.testing.assert_allclose(np.exp(np.asarray(scores)), np.asarray(expected), atol=1e-6)


def test_view_sizes_and_bad_scales():
  assert tta.view_size((480, 640), 0.75, 16) == (368, 480)  # 360 -> 368 (23 x 16)
  assert tta.view_size((32, 48), 0.1, 16) == (16, 16)
  assert tta.parse_scales('1.0, 0.75,1.25') == (1.0, 0.75, 1.25)
  for text in ('', '1.0,-1', 'big'):
    with pytest.raises(ValueError, match='tta scales'):
      tta.parse_scales(text)
  with pytest.raises(ValueError, match='SAME-padded'):
    tta.tta_apply(lambda v, x, train=False: x, scales=(1.0, 0.5), padding='VALID')


def test_identity_tta_evaluation_equals_the_plain_eval_step(trained):
  summary, _ = evaluate.evaluate_workdir(str(trained['workdir']), 'validation', 'latest',
                                         num_images=0, tta_flip=False, tta_scales=['1.0'])
  mesh = sharding.create_mesh()
  config, variables, _ = checkpointing.restore_model(str(trained['workdir']), 'latest')
  data, _ = evaluate.load_split(config, mesh, 'validation', None, str(trained['workdir']))
  plain = evaluation.evaluate(evaluation.compile_eval_step(config, mesh, models.unet_from_config(
      config.model)), variables, data)
  np.testing.assert_array_equal(summary['confusion_matrix'], plain['confusion_matrix'])
  flipped, _ = evaluate.evaluate_workdir(str(trained['workdir']), 'validation', 'latest',
                                         num_images=0, tta_flip=True, tta_scales=['1.0', '2.0'])
  assert flipped['confusion_matrix'].sum() == plain['confusion_matrix'].sum()


def test_predict_with_flip_writes_the_averaged_prediction(trained, tmp_path):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  image = np.random.default_rng(5).integers(0, 256, (45, 61, 3), np.uint8)
  (inputs / 'frame.png').write_bytes(carla_files.encode_png(image))
  run = predict.predict_files(str(trained['workdir']), str(inputs), str(tmp_path / 'out'),
                              checkpoint='latest', tta_flip=True)
  assert not run.failed
  config, variables, _ = checkpointing.restore_model(str(trained['workdir']), 'latest')
  model = models.unet_from_config(config.model)
  x = predict.model_input(image, 'resize', tuple(config.data.image_size))[None]
  average = (_probabilities(model.apply(variables, x))
             + _probabilities(model.apply(variables, x[:, :, ::-1])[:, :, ::-1]))
  expected = predict.restore_size(np.asarray(np.argmax(average[0], -1), np.uint8), (45, 61))
  _, mask = carla_files.read_pair(carla_files.Pair('frame', inputs / 'frame.png',
                                                   tmp_path / 'out' / 'frame_mask.png'))
  np.testing.assert_array_equal(mask, expected)


def _workdir_with_inference(trained, tmp_path, inference):
  """A copy of the trained workdir whose config.json holds `inference` (None: no such field)."""
  workdir = tmp_path / 'workdir'
  shutil.copytree(trained['workdir'], workdir)
  values = json.loads((workdir / 'config.json').read_text())
  values.pop('inference', None)
  if inference is not None:
    values['inference'] = inference
  (workdir / 'config.json').write_text(json.dumps(values))
  return workdir


def test_evaluate_takes_frame_size_and_augmentation_from_the_config(trained, tmp_path):
  workdir = _workdir_with_inference(
      trained, tmp_path, {'eval_size': [48, 64], 'tta_flip': True, 'tta_scales': [1.0, 0.5]})
  default, out_dir = evaluate.evaluate_workdir(str(workdir), 'validation', 'latest', num_images=0)
  explicit, _ = evaluate.evaluate_workdir(str(trained['workdir']), 'validation', 'latest',
                                          num_images=0, tta_flip=True, tta_scales=['1.0', '0.5'],
                                          eval_size=['48', '64'])
  np.testing.assert_array_equal(default['confusion_matrix'], explicit['confusion_matrix'])
  frames = trained['final']['confusion_matrix'].sum() // (32 * 32)
  assert default['confusion_matrix'].sum() == frames * 48 * 64  # whole 48x64 frames scored
  assert default['eval_size'] == (48, 64)
  assert default['tta'] == {'flip': True, 'scales': [1.0, 0.5]}
  record = json.loads((out_dir / 'metrics.json').read_text())
  assert record['eval_size'] == [48, 64] and record['model_size'] == [32, 32]
  assert 'Scored on whole frames at 48x64 (the model sees them at 32x32); test-time ' \
         'augmentation: flip, scales 1,0.5.' in (out_dir / 'report.md').read_text()
  # The flags override the config: the model alone at its own size is training's evaluation.
  alone, _ = evaluate.evaluate_workdir(str(workdir), 'validation', 'latest', num_images=0,
                                       tta_flip=False, tta_scales=['1.0'], eval_size='model')
  np.testing.assert_array_equal(alone['confusion_matrix'], trained['final']['confusion_matrix'])
  assert not np.array_equal(default['confusion_matrix'], alone['confusion_matrix'])


def test_a_workdir_without_inference_settings_scores_the_model_alone(trained, tmp_path):
  workdir = _workdir_with_inference(trained, tmp_path, None)
  summary, _ = evaluate.evaluate_workdir(str(workdir), 'validation', 'latest', num_images=0)
  np.testing.assert_array_equal(summary['confusion_matrix'], trained['final']['confusion_matrix'])
  assert summary['eval_size'] == (32, 32)
  assert summary['tta'] == {'flip': False, 'scales': [1.0]}
  assert tta.settings(checkpointing.load_config(str(workdir))) == (False, (1.0,))


def test_predict_takes_its_augmentation_from_the_config(trained, tmp_path):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  image = np.random.default_rng(6).integers(0, 256, (45, 61, 3), np.uint8)
  (inputs / 'frame.png').write_bytes(carla_files.encode_png(image))
  workdir = _workdir_with_inference(
      trained, tmp_path, {'eval_size': [], 'tta_flip': True, 'tta_scales': [1.0]})

  def mask(folder, *args, **kwargs):
    run = predict.predict_files(*args, str(inputs), str(tmp_path / folder), checkpoint='latest',
                                **kwargs)
    assert not run.failed
    return carla_files.read_pair(carla_files.Pair(
        'frame', inputs / 'frame.png', tmp_path / folder / 'frame_mask.png'))[1]

  default = mask('default', str(workdir))
  np.testing.assert_array_equal(default, mask('flip', str(trained['workdir']), tta_flip=True))
  plain = mask('plain', str(trained['workdir']), tta_flip=False)
  np.testing.assert_array_equal(mask('override', str(workdir), tta_flip=False), plain)
  assert not np.array_equal(default, plain)


def test_describe_names_the_views():
  assert tta.describe(False, (1.0,)) == 'none'
  assert tta.describe(True, (1.0,)) == 'flip'
  assert tta.describe(True, (0.5, 0.75, 1.0, 1.25)) == 'flip, scales 0.5,0.75,1,1.25'
  assert tta.describe(False, (1.0, 1.5)) == 'scales 1,1.5'
