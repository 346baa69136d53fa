"""The U-Net: structure, parameter counts, sizes, and the up-convolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import models


def _param_shapes(model, input_shape):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape)))
  return variables['params']


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _kernels(params):
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  return [leaf.shape for path, leaf in paths if path[-1].key == 'kernel']


def test_depth_4_has_23_convolution_layers():
  kernels = _kernels(_param_shapes(models.UNet(base_filters=32), (1, 96, 128, 3)))
  spatial = [shape[:2] for shape in kernels]
  assert len(kernels) == 23
  assert spatial.count((3, 3)) == 18
  assert spatial.count((2, 2)) == 4
  assert spatial.count((1, 1)) == 1


@pytest.mark.parametrize('base_filters, expected', [(32, 7_760_823), (64, 31_033_175)])
def test_parameter_count(base_filters, expected):
  params = _param_shapes(models.UNet(base_filters=base_filters, num_classes=23), (1, 96, 128, 3))
  assert _count(params) == expected


def test_lab_network_parameter_count():
  # The CARLA lab network: 3x3 stride-2 up-convolutions, one more 3x3 conv of 32.
  model = models.UNet(base_filters=32, upconv_kernel_size=3, head_filters=32)
  assert _count(_param_shapes(model, (1, 96, 128, 3))) == 8_640_471


def test_channels_double_down_and_halve_up():
  params = _param_shapes(models.UNet(base_filters=8), (1, 64, 64, 3))
  assert [params[f'down{i}']['conv1']['kernel'].shape[-1] for i in range(4)] == [8, 16, 32, 64]
  assert params['bottleneck']['conv1']['kernel'].shape[-1] == 128
  assert [params[f'upconv{i}']['kernel'].shape[-1] for i in range(4)] == [8, 16, 32, 64]
  # Each up block sees the up-convolution's channels plus the skip's.
  assert params['up0']['conv0']['kernel'].shape[2] == 16


@pytest.mark.parametrize('size', [(96, 128), (64, 64), (480, 640)])
def test_same_padding_keeps_the_input_size(size):
  model = models.UNet(base_filters=2, num_classes=5)
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, *size, 3)))[0])
  assert out.shape == (1, *size, 5)
  assert models.output_size(size) == size


def test_valid_padding_572_gives_388():
  model = models.UNet(base_filters=2, num_classes=2, padding='VALID')
  out = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, 572, 572, 1)))[0])
  assert out.shape == (1, 388, 388, 2)
  assert models.output_size((572, 572), padding='VALID') == (388, 388)
  assert models.smallest_input_for_output((388, 388), padding='VALID') == (572, 572)
  assert models.smallest_input_for_output((300, 389), padding="VALID") == (492, 588)
  assert models.output_size((492, 588), padding="VALID") == (308, 404)


def test_center_crop_on_a_hand_built_example():
  x = jnp.arange(6 * 8).reshape(1, 6, 8, 1)
  cropped = models.center_crop(x, 2, 4)
  np.testing.assert_array_equal(cropped[0, :, :, 0], [[18, 19, 20, 21], [26, 27, 28, 29]])
  assert models.center_crop(x, 6, 8) is not None
  np.testing.assert_array_equal(models.center_crop(x, 6, 8), x)


@pytest.mark.parametrize('size, padding, nearest', [
    ((100, 128), 'SAME', '96 or 112'),
    ((570, 572), 'VALID', '556 or 572'),
])
def test_invalid_size_is_a_clear_error(size, padding, nearest):
  model = models.UNet(base_filters=2, padding=padding)
  with pytest.raises(ValueError, match=rf'{size[0]}.*nearest valid: {nearest}'):
    model.init(jax.random.key(0), jnp.zeros((1, *size, 3)))


def test_upconv_equals_flax_conv_transpose():
  x = jax.random.normal(jax.random.key(1), (2, 5, 7, 6))
  reference = nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding='VALID')
  params = reference.init(jax.random.key(2), x)
  params = jax.tree.map(lambda p: jax.random.normal(jax.random.key(3), p.shape), params)
  ours = models.UpConv2x2(4).apply(params, x)
  np.testing.assert_allclose(ours, reference.apply(params, x), rtol=1e-5, atol=1e-5)


def test_bfloat16_forward_is_close_to_float32():
  x = jax.random.uniform(jax.random.key(0), (2, 32, 48, 3))
  model32 = models.UNet(base_filters=8, num_classes=5, depth=3)
  params = model32.init(jax.random.key(1), x)
  logits32 = model32.apply(params, x)
  model16 = models.UNet(base_filters=8, num_classes=5, depth=3, dtype=jnp.bfloat16)
  logits16 = model16.apply(params, x)
  assert logits16.dtype == jnp.float32  # logits are returned in float32 for the loss
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  scale = float(jnp.abs(logits32).max())
  np.testing.assert_allclose(logits16, logits32, atol=0.05 * scale)
  assert float(jnp.abs(logits16 - logits32).max()) > 0  # really computed in bfloat16


def test_dropout_only_in_training():
  model = models.UNet(base_filters=4, num_classes=3, depth=2, dropout_rate=0.5, dropout_blocks=2)
  x = jax.random.uniform(jax.random.key(0), (1, 16, 16, 3))
  params = model.init(jax.random.key(1), x)
  eval_a = model.apply(params, x)
  np.testing.assert_array_equal(eval_a, model.apply(params, x))
  train_a = model.apply(params, x, train=True, rngs={'dropout': jax.random.key(2)})
  train_b = model.apply(params, x, train=True, rngs={'dropout': jax.random.key(3)})
  assert not np.allclose(train_a, train_b)


def test_batch_norm_option_adds_statistics():
  model = models.UNet(base_filters=4, num_classes=3, depth=2, use_batch_norm=True)
  variables = model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)))
  assert 'batch_stats' in variables
  _, updates = model.apply(variables, jnp.ones((2, 16, 16, 3)), train=True,
                           mutable=['batch_stats'])
  assert 'batch_stats' in updates


def test_batch_norm_replaces_the_bias_of_the_block_convolutions():
  # Each block convolution of C channels drops its bias (C) and its batch norm
  # adds a scale and an offset (2C): C more parameters per convolution.
  def count(**options):
    model = models.UNet(base_filters=4, num_classes=3, depth=2, **options)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
    return params['params'], sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params['params']))

  params, with_norm = count(use_batch_norm=True)
  _, without = count()
  block_channels = 2 * (4 + 8 + 16) + 2 * (8 + 4)  # down, bottleneck, up
  assert with_norm == without + block_channels
  assert set(params['down0']['conv0']) == {'kernel'}
  assert set(params['classifier']) == {'kernel', 'bias'}
