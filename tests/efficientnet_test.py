"""The EfficientNet-Lite encoders, their ImageNet weights and the U-Net built on them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import efficientnet
from unet_jax import models
from unet_jax import pretrained
from unet_jax import torch_weights


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _weights_file(variant='lite0'):
  try:
    return pretrained.weights_path(variant)
  except pretrained.PretrainedWeightsError as error:
    pytest.skip(str(error))


@pytest.fixture(scope='module')
def weights_file():
  return _weights_file()


# The published definitions, written out: the stride of each block, the
# blocks whose outputs are the features at strides 2 to 32, and those
# features' channels. Lite0 has 16 blocks in stages of 1, 2, 2, 3, 3, 4, 1;
# Lite1 and Lite2 21, in stages of 1, 3, 3, 4, 4, 5, 1.
PUBLISHED = {
    'lite0': ((1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1), (0, 2, 4, 10, 15),
              (16, 24, 40, 112, 320)),
    'lite1': ((1, 2, 1, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1), (0, 3, 6, 14, 20),
              (16, 24, 40, 112, 320)),
    'lite2': ((1, 2, 1, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1), (0, 3, 6, 14, 20),
              (16, 24, 48, 120, 352)),
}


def _reference_features(state_dict, images, variant='lite0'):
  """The same network written directly from the state dict, in its own layout.

  Convolutions are `lax.conv_general_dilated` on NCHW activations and the
  state dict's (out, in, kh, kw) kernels with TensorFlow's SAME pads spelt
  out; batch norm is its inference formula. Nothing of `efficientnet`,
  `pretrained` or Flax is used, and the block strides are `PUBLISHED`'s.
  """
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}

  def conv(x, weight, stride):
    kernel = weight.shape[-1]
    pads = []
    for length in x.shape[2:]:
      out = -(-length // stride)
      total = max((out - 1) * stride + kernel - length, 0)
      pads.append((total // 2, total - total // 2))  # TensorFlow SAME: the extra pixel after
    groups = x.shape[1] if weight.shape[1] == 1 and x.shape[1] > 1 else 1
    return jax.lax.conv_general_dilated(
        x, weight, (stride, stride), pads, dimension_numbers=('NCHW', 'OIHW', 'NCHW'),
        feature_group_count=groups, precision=jax.lax.Precision.HIGHEST)

  def bn(x, name):
    mean, var, scale, bias = (sd[f'{name}.{field}'][None, :, None, None] for field in (
        'running_mean', 'running_var', 'weight', 'bias'))
    return (x - mean) / np.sqrt(var + 1e-3) * scale + bias

  def relu6(x):
    return jnp.clip(x, 0, 6)

  x = jnp.transpose(jnp.asarray(images), (0, 3, 1, 2))
  x = relu6(bn(conv(x, sd['_conv_stem.weight'], 2), '_bn0'))
  features = []
  block_strides, feature_blocks, _ = PUBLISHED[variant]
  for index, stride in enumerate(block_strides):
    prefix = f'_blocks.{index}'
    inputs = x
    if f'{prefix}._expand_conv.weight' in sd:
      x = relu6(bn(conv(x, sd[f'{prefix}._expand_conv.weight'], 1), f'{prefix}._bn0'))
    x = relu6(bn(conv(x, sd[f'{prefix}._depthwise_conv.weight'], stride), f'{prefix}._bn1'))
    x = bn(conv(x, sd[f'{prefix}._project_conv.weight'], 1), f'{prefix}._bn2')
    if stride == 1 and x.shape == inputs.shape:
      x = x + inputs
    if index in feature_blocks:
      features.append(np.asarray(jnp.transpose(x, (0, 2, 3, 1))))
  assert len(block_strides) == len({k.split('.')[1] for k in sd if k.startswith('_blocks.')})
  return features


@pytest.mark.parametrize('variant', efficientnet.VARIANTS)
def test_converted_encoder_matches_the_network_written_from_the_state_dict(variant):
  weights_file = _weights_file(variant)
  state_dict = torch_weights.load_state_dict(weights_file)
  variables = pretrained.load_encoder_variables(weights_file, variant=variant, use_cache=False)
  images = np.random.default_rng(0).normal(size=(2, 64, 96, 3)).astype(np.float32)
  ours = efficientnet.EfficientNetLite(variant).apply(variables, images, train=False)
  theirs = _reference_features(state_dict, images, variant)
  channels = PUBLISHED[variant][2]
  assert [f.shape for f in ours] == [(2, 32 // s, 48 // s, c)
                                     for s, c in zip((1, 2, 4, 8, 16), channels)]
  for a, b in zip(ours, theirs):
    scale = float(np.abs(b).max())
    np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-4 * scale)


def test_tensorflow_same_padding_is_asymmetric_on_stride_2():
  # A 3x3 stride-2 kernel of ones over an even side: pads (0, 1), so the first
  # output sums rows/columns 0..2 and the last one sums the last 2 (+ padding).
  conv = efficientnet.nn.Conv(1, (3, 3), strides=2, padding='SAME', use_bias=False)
  x = jnp.ones((1, 4, 4, 1))
  out = conv.apply({'params': {'kernel': jnp.ones((3, 3, 1, 1))}}, x)[0, :, :, 0]
  np.testing.assert_array_equal(out, [[9, 6], [6, 4]])


def test_normalize_maps_0_255_as_the_tensorflow_lite_models():
  np.testing.assert_allclose(efficientnet.normalize(jnp.array([0.0, 127 / 255, 1.0])),
                             [-127 / 128, 0.0, 1.0], atol=1e-6)


# State dict: 4,694,073 numbers. Unused by the encoder: the classifier _fc
# (1280 x 1000 + 1000), the head convolution _conv_head (320 x 1280) and its
# batch norm _bn1 (4 x 1280), and the 49 num_batches_tracked counters (one
# per batch norm). The rest are the encoder's params and batch_stats.
ENCODER_NUMBERS = 4_694_073 - (1280 * 1000 + 1000) - 320 * 1280 - 4 * 1280 - 49


def test_encoder_variables_are_the_state_dicts_minus_the_head():
  variables = jax.eval_shape(lambda: efficientnet.EfficientNetLite().init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert ENCODER_NUMBERS == 2_998_304
  assert _count(variables['params']) + _count(variables['batch_stats']) == ENCODER_NUMBERS
  # Running mean and variance: two per channel of each of the 48 batch norms,
  # 19,728 channels: stem 32, block 0 32 + 16, then 2 x hidden + out per block.
  channels = 32 + 32 + 16 + sum(2 * 6 * cin + cout for cin, cout in (
      (16, 24), (24, 24), (24, 40), (40, 40), (40, 80), (80, 80), (80, 80), (80, 112),
      (112, 112), (112, 112), (112, 192), (192, 192), (192, 192), (192, 192), (192, 320)))
  assert channels == 19_728
  assert _count(variables['batch_stats']) == 2 * channels
  assert _count(variables['params']) == ENCODER_NUMBERS - 2 * channels == 2_958_848


@pytest.mark.parametrize('variant', efficientnet.VARIANTS)
def test_block_layout_is_the_published_one(variant):
  block_strides, feature_blocks, channels = PUBLISHED[variant]
  assert [spec[1] for spec in efficientnet.block_specs(variant)] == list(block_strides)
  assert efficientnet.feature_blocks(variant) == feature_blocks
  assert efficientnet.feature_channels(variant) == channels


# Lite2's state dict: 6,150,232 numbers. The head is _fc (1280 x 1000 + 1000),
# _conv_head (352 x 1280) and _bn1 (4 x 1280); 64 num_batches_tracked counters
# (stem, 2 in block 0, 3 in each of the other 20 blocks, and _bn1).
LITE2_ENCODER_NUMBERS = 6_150_232 - (1280 * 1000 + 1000) - 352 * 1280 - 4 * 1280 - 64


def test_lite2_encoder_variables_are_its_state_dicts_minus_the_head():
  variables = jax.eval_shape(lambda: efficientnet.EfficientNetLite('lite2').init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert LITE2_ENCODER_NUMBERS == 4_413_488
  assert _count(variables['params']) + _count(variables['batch_stats']) == LITE2_ENCODER_NUMBERS
  # 2 x hidden + out batch-norm channels per block after block 0 (expansion 6).
  ins_outs = [(16, 24), (24, 24), (24, 24), (24, 48), (48, 48), (48, 48), (48, 88), (88, 88),
              (88, 88), (88, 88), (88, 120), (120, 120), (120, 120), (120, 120), (120, 208),
              (208, 208), (208, 208), (208, 208), (208, 208), (208, 352)]
  channels = 32 + 32 + 16 + sum(2 * 6 * cin + cout for cin, cout in ins_outs)
  assert _count(variables['batch_stats']) == 2 * channels
  file = _weights_file('lite2')
  state = torch_weights.load_state_dict(file)
  assert sum(int(np.prod(np.shape(v))) for v in state.values()) == 6_150_232


def test_unet_on_each_encoder_concatenates_its_features():
  for variant, skip_16 in (('lite0', 112), ('lite1', 112), ('lite2', 120)):
    model = models.unet_from_config(_model_config(encoder=f'efficientnet_{variant}',
                                                  decoder_filters=(8, 8, 8, 8, 8)))
    assert model.encoder == variant
    variables = jax.eval_shape(lambda m=model: m.init(jax.random.key(0),
                                                      jnp.zeros((1, 64, 64, 3))))
    # The first decoder convolution takes the up-convolution's 8 channels
    # and the encoder's stride-16 features.
    assert variables['params']['up4']['conv0']['kernel'].shape == (3, 3, 8 + skip_16, 8)
    logits = jax.eval_shape(lambda v, m=model: m.apply(v, jnp.zeros((2, 64, 96, 3))), variables)
    assert logits.shape == (2, 64, 96, 23)


def test_efficientnet_unet_parameter_count_and_output_size():
  model = models.EfficientNetUNet(num_classes=23)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 96, 128, 3))))
  # Decoder, level by level: 2x2 up-convolution (4 x in x out + out), then two
  # 3x3 convolutions without bias on (out + skip) and out channels, each with
  # a batch norm scale and bias.
  decoder, channels = 0, 320
  for out, skip in zip((256, 128, 64, 32, 16), (112, 40, 24, 16, 0)):
    decoder += 4 * channels * out + out
    decoder += 9 * (out + skip) * out + 9 * out * out + 2 * 2 * out
    channels = out
  classifier = 16 * 23 + 23
  assert decoder + classifier == 2_398_519
  assert _count(variables['params']) == 2_958_848 + 2_398_519 == 5_357_367
  logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 96, 128, 3))), variables)
  assert logits.shape == (2, 96, 128, 23)
  assert models.label_size(_model_config(), (96, 128)) == (96, 128)


def _model_config(**overrides):
  from configs import carla_pretrained  # pylint: disable=g-import-not-at-top
  config = carla_pretrained.get_config().model
  config.update(overrides)
  return config


def test_sizes_that_are_not_multiples_of_32_are_refused_with_the_nearest():
  with pytest.raises(ValueError, match=r'height 100 \(nearest valid: 96 or 128\)'):
    models.label_size(_model_config(), (100, 128))
  with pytest.raises(ValueError, match='multiples of 32'):
    efficientnet.EfficientNetLite().init(jax.random.key(0), jnp.zeros((1, 48, 64, 3)))


def test_frozen_batch_norm_keeps_the_running_statistics_in_training():
  model = models.EfficientNetUNet(num_classes=3, decoder_filters=(8, 8, 8, 8, 8),
                                  frozen_encoder_batch_norm=True)
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  same = jax.tree.map(np.array_equal, variables['batch_stats']['encoder'],
                      updates['batch_stats']['encoder'])
  assert all(jax.tree.leaves(same))
  changed = jax.tree.map(np.array_equal, variables['batch_stats']['up0'],
                         updates['batch_stats']['up0'])
  assert not all(jax.tree.leaves(changed))  # the decoder's batch norm still trains


def test_drop_path_rates_grow_linearly_from_zero():
  rates = efficientnet.drop_path_rates(0.2, 16)
  assert rates[0] == 0.0
  np.testing.assert_allclose(rates[8], 0.1)  # 0.2 * 8 / 16
  np.testing.assert_allclose(rates[15], 0.1875)  # 0.2 * 15 / 16
  np.testing.assert_allclose(np.diff(rates), 0.0125)


def test_drop_path_zeroes_whole_examples_and_scales_the_others():
  branch = jax.random.uniform(jax.random.key(3), (4000, 2, 3, 5), minval=0.5, maxval=1.5)
  out = np.asarray(efficientnet.drop_path(branch, 0.25, jax.random.key(4)))
  dropped = np.all(out == 0, axis=(1, 2, 3))
  kept = np.all(np.isclose(out, np.asarray(branch) / 0.75), axis=(1, 2, 3))
  assert np.all(dropped ^ kept)  # each example wholly one or the other
  # 4000 draws at 0.25: standard deviation of the share 0.007.
  assert abs(dropped.mean() - 0.25) < 0.03
  np.testing.assert_allclose(out.mean(), np.asarray(branch).mean(), rtol=0.03)


def test_drop_path_in_a_residual_block_drops_or_scales_its_branch():
  block = efficientnet.MBConv(3, 1, 6, 8, drop_path_rate=0.5)
  x = jax.random.normal(jax.random.key(5), (16, 8, 8, 8))
  variables = block.init(jax.random.key(0), x, train=False)
  plain = efficientnet.MBConv(3, 1, 6, 8)
  # In training the batch norm uses the batch's statistics either way.
  full, _ = plain.apply(variables, x, train=True, mutable=['batch_stats'])
  branch = np.asarray(full - x)
  out, _ = block.apply(variables, x, train=True, mutable=['batch_stats'],
                       rngs={'dropout': jax.random.key(6)})
  out = np.asarray(out)
  dropped = np.all(np.isclose(out, x, atol=1e-5), axis=(1, 2, 3))
  doubled = np.all(np.isclose(out, x + 2 * branch, atol=1e-5), axis=(1, 2, 3))
  assert np.all(dropped ^ doubled)
  assert 0 < dropped.sum() < 16  # key 6 drops some examples and keeps others
  # Evaluation uses every branch, unscaled, and needs no random key.
  np.testing.assert_array_equal(block.apply(variables, x, train=False),
                                plain.apply(variables, x, train=False))


def test_encoder_drop_path_reaches_the_blocks_only_in_training():
  model = models.unet_from_config(_model_config(decoder_filters=(8, 8, 8, 8, 8),
                                                encoder_drop_path_rate=0.3))
  x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  still = models.unet_from_config(_model_config(decoder_filters=(8, 8, 8, 8, 8)))
  np.testing.assert_array_equal(model.apply(variables, x), still.apply(variables, x))
  train_logits = [model.apply(variables, x, train=True, mutable=['batch_stats'],
                              rngs={'dropout': jax.random.key(k)})[0] for k in (1, 2)]
  assert not np.allclose(train_logits[0], train_logits[1])
  # A config written before the field existed builds the model without it.
  old = _model_config()
  del old['encoder_drop_path_rate']
  assert models.unet_from_config(old).encoder_drop_path_rate == 0.0


def test_global_context_appends_the_frame_average_through_its_convolution():
  x = jax.random.normal(jax.random.key(7), (2, 3, 5, 6))
  module = models.GlobalContext(4)
  variables = module.init(jax.random.key(0), x)
  kernel = np.asarray(variables['params']['conv']['kernel'])[0, 0]  # (6, 4)
  bias = np.asarray(variables['params']['conv']['bias'])
  out = np.asarray(module.apply(variables, x))
  assert out.shape == (2, 3, 5, 10)
  np.testing.assert_array_equal(out[..., :6], x)  # the features pass through unchanged
  # By hand: each example's 15 positions averaged, then the 1x1 convolution and ReLU.
  for example in range(2):
    average = np.asarray(x[example]).reshape(15, 6).mean(axis=0)
    want = np.maximum(average @ kernel + bias, 0)
    np.testing.assert_allclose(out[example, ..., 6:], np.broadcast_to(want, (3, 5, 4)),
                               rtol=1e-5, atol=1e-6)


def test_global_context_lets_every_position_see_the_whole_frame():
  # Frames 2048 wide that differ only in their first 512 columns: the
  # encoder's receptive field stops about 480 columns further, so without the
  # context the last 512 columns of the logits are exactly the same; with it
  # they change too, through the frame's average.
  x = jax.random.uniform(jax.random.key(1), (1, 32, 2048, 3))
  y = x.at[:, :, :512].set(1.0 - x[:, :, :512])
  change = {}
  for filters in (0, 16):
    model = models.unet_from_config(_model_config(decoder_filters=(8, 8, 8, 8, 8),
                                                  global_context_filters=filters))
    variables = model.init(jax.random.key(0), x)
    if filters:
      # The first up-convolution takes the 320 encoder channels plus the context's.
      assert variables['params']['upconv4']['kernel'].shape[-2] == 320 + filters
      # A larger context kernel than at initialisation, so that its effect
      # stands far above rounding.
      variables['params']['context']['conv']['kernel'] *= 1e4
    right = lambda images: np.asarray(model.apply(variables, images))[:, :, -512:]  # pylint: disable=cell-var-from-loop
    change[filters] = np.abs(right(x) - right(y)).max() / np.abs(right(x)).max()
  assert change[0] == 0.0
  assert change[16] > 1e-5  # float32 rounding is near 1e-7
  # Any size the encoder takes: the average is over whatever frame arrives.
  assert model.apply(variables, jnp.zeros((2, 96, 32, 3))).shape == (2, 96, 32, 23)


def test_global_context_is_off_for_old_configs_and_by_default():
  old = _model_config()
  del old['global_context_filters']
  model = models.unet_from_config(old)
  assert model.global_context_filters == 0
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert 'context' not in variables['params']


def test_deep_supervision_adds_classifiers_that_run_only_in_training():
  x = jax.random.uniform(jax.random.key(3), (2, 64, 96, 3))
  model = models.unet_from_config(_model_config(decoder_filters=(8, 8, 8, 8, 8),
                                                deep_supervision=0.5))
  plain = models.unet_from_config(_model_config(decoder_filters=(8, 8, 8, 8, 8)))
  variables = model.init(jax.random.key(0), x)
  heads = {stride: models.aux_head_name(stride) for stride in models.AUX_STRIDES}
  assert models.AUX_STRIDES == (2, 4, 8)
  for name in heads.values():
    assert variables['params'][name]['kernel'].shape == (1, 1, 8, 23)
  assert set(plain.init(jax.random.key(0), x)['params']).isdisjoint(heads.values())
  # Inference: the same logits as the network without the heads, and nothing sown.
  without = {**variables, 'params': {k: v for k, v in variables['params'].items()
                                     if k not in heads.values()}}
  logits, state = model.apply(variables, x, mutable=['intermediates'])
  np.testing.assert_array_equal(logits, plain.apply(without, x))
  assert not state.get('intermediates')
  # Training: one set of logits per stride at that stride's size, from that head.
  _, state = model.apply(variables, x, train=True, mutable=['batch_stats', 'intermediates'])
  for stride, name in heads.items():
    aux, = state['intermediates'][models.aux_logits_name(stride)]
    assert aux.shape == (2, 64 // stride, 96 // stride, 23)
    moved = jax.tree.map(lambda a: a, variables)
    moved['params'][name]['bias'] = moved['params'][name]['bias'] + 1.0
    _, moved_state = model.apply(moved, x, train=True, mutable=['batch_stats', 'intermediates'])
    for other in models.AUX_STRIDES:
      shift = (moved_state['intermediates'][models.aux_logits_name(other)][0] -
               state['intermediates'][models.aux_logits_name(other)][0])
      np.testing.assert_allclose(shift, 1.0 if other == stride else 0.0, atol=1e-5)


def test_deep_supervision_is_off_for_old_configs():
  old = _model_config()
  del old['deep_supervision']
  assert not models.unet_from_config(old).deep_supervision
