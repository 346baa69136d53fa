"""Every config in configs/ loads, builds its model and trains at a tiny size."""

import importlib
import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from unet_jax import config_checks
from unet_jax import models
from unet_jax import pretrained
from unet_jax import sharding
from unet_jax import train

CONFIG_NAMES = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / 'configs').glob('*.py')
                      if not p.stem.startswith('_'))


def _load(name, arg=None):
  return importlib.import_module(f'configs.{name}').get_config(arg)


def test_the_expected_configs_exist():
  assert {'carla', 'carla_lab', 'carla_pretrained', 'unet_paper', 'synthetic'} <= set(CONFIG_NAMES)


def test_unet_paper_is_the_papers_network():
  # 23 convolutions with biases and no batch norm: the 31,033,175 parameters
  # of the paper's layout with 23 classes (the PyTorch peer's count too).
  config = _load('unet_paper')
  assert not config.model.use_batch_norm and config.model.padding == 'VALID'
  model = models.unet_from_config(config.model)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros(
      (1, *config.data.image_size, 3))))['params']
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == 31_033_175
  assert models.output_size(config.data.image_size, model.depth, model.padding) == (388, 388)


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_config_is_valid_and_its_model_accepts_its_image_size(name):
  config = _load(name)
  config_checks.check_config(config, num_devices=1)
  models.unet_from_config(config.model)
  size = models.label_size(config.model, config.data.image_size)
  assert all(n > 0 for n in size)


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_config_trains_at_a_tiny_size(name):
  config = _load(name)
  config.model.base_filters = 2
  config.model.decoder_filters = (2, 2, 2, 2, 2)
  config.batch_size = 2
  if config.model.encoder == 'unet':
    config.data.image_size = models.smallest_input_for_output(
        (1, 1), config.model.depth, config.model.padding)
  else:
    config.data.image_size = (32, 32)
    if config.model.pretrained and importlib.util.find_spec(pretrained.PACKAGES[
        models.encoder_variant(config.model)][0]) is None:
      config.model.pretrained = False  # the weights package is an extra
  mesh = sharding.create_mesh()
  model = models.unet_from_config(config.model)
  learning_rate_fn = train.create_learning_rate_fn(config, 10)
  state = train.create_replicated_train_state(config, model, learning_rate_fn,
                                              train.initial_keys(0)[0], mesh)
  step = train.compile_train_step(config, mesh, learning_rate_fn, class_weights=None)
  height, width = config.data.image_size
  label_size = models.label_size(config.model, (height, width))
  rng = np.random.default_rng(0)
  batch = {'image': rng.random((2, height, width, 3), np.float32),
           'label': rng.integers(0, config.model.num_classes, (2, *label_size)).astype(np.int32),
           'valid': np.ones(2, bool)}
  before = jax.tree.map(np.asarray, state.params)
  for _ in range(2):  # a warm-up from zero leaves the first step's learning rate at 0
    state, metrics = step(state, batch, jax.random.key(1))
  assert int(state.step) == 2 and np.isfinite(float(metrics['loss']))
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, jax.device_get(state.params))
  assert any(jax.tree.leaves(changed))


def test_lab_config_network_has_the_study_parameter_count():
  config = _load('carla_lab')
  model = models.unet_from_config(config.model)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 96, 128, 3))))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params'])) == 8_640_471


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_smoke_variant_is_tiny(name):
  config = _load(name, 'smoke')
  assert config.batch_size <= 4 and config.model.base_filters <= 4
