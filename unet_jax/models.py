"""The U-Net of Ronneberger et al. (2015) as a Flax linen module.

Contracting path: `depth` blocks of two 3x3 convolutions + ReLU, then 2x2 max
pooling; channels start at `base_filters` and double every block. Bottleneck:
two 3x3 convolutions with the channels doubled once more. Expanding path: a
2x2 stride-2 up-convolution halving the channels, concatenation with the
(centre-cropped) skip features, two 3x3 convolutions. A 1x1 convolution gives
one logit per class.

`EfficientNetUNet` is the same family with an EfficientNet-Lite0, -Lite1 or
-Lite2 encoder (`unet_jax.efficientnet`, ImageNet weights through
`unet_jax.pretrained`) and the paper's decoder over its stride 2..32 features.

The modules take no config and do no I/O; `unet_from_config` maps a config's
`model` section onto the one its `encoder` names, and `label_size` gives
callers the input check and output size of either. Size arithmetic
(`output_size`, `smallest_input_for_output`, `check_input_size`) is exposed
so that data and prediction code can use it.
"""

from collections.abc import Sequence
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from unet_jax import efficientnet

Dtype = jnp.dtype


# --------------------------------------------------------------------------
# Size arithmetic.


def _output_length(length: int, depth: int, padding: str) -> int | None:
  """Output length along one axis, or None where the length is invalid."""
  if length <= 0:
    return None
  if padding == 'SAME':
    return length if length % (2**depth) == 0 else None
  # VALID: each 3x3 convolution removes a one-pixel border.
  for _ in range(depth):
    length -= 4
    if length <= 0 or length % 2:
      return None
    length //= 2
  length -= 4  # bottleneck
  if length <= 0:
    return None
  for _ in range(depth):
    length = 2 * length - 4
  return length if length > 0 else None


def _nearest_valid_lengths(length: int, depth: int, padding: str) -> tuple[int | None, int | None]:
  below = next((n for n in range(length - 1, 0, -1) if _output_length(n, depth, padding)), None)
  above = next(n for n in range(length + 1, length + 2**(depth + 3) + 200)
               if _output_length(n, depth, padding))
  return below, above


def check_input_size(size: Sequence[int], depth: int = 4, padding: str = 'SAME') -> None:
  """Raises ValueError naming the size and the nearest valid sizes."""
  if padding not in ('SAME', 'VALID'):
    raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
  bad = []
  for axis, length in zip(('height', 'width'), size):
    if _output_length(int(length), depth, padding) is None:
      below, above = _nearest_valid_lengths(int(length), depth, padding)
      nearest = ' or '.join(str(n) for n in (below, above) if n)
      bad.append(f'{axis} {length} (nearest valid: {nearest})')
  if bad:
    rule = (f'a multiple of 2**depth = {2**depth}' if padding == 'SAME' else
            'a size whose feature maps stay even before every pooling')
    raise ValueError(
        f'U-Net (depth={depth}, padding={padding}) cannot take an input of size '
        f'{tuple(size)}: {"; ".join(bad)}. Each side must be {rule}.')


def output_size(size: Sequence[int], depth: int = 4, padding: str = 'SAME') -> tuple[int, ...]:
  """Spatial size of the logits for an input of spatial `size`."""
  check_input_size(size, depth, padding)
  return tuple(_output_length(int(n), depth, padding) for n in size)


def smallest_input_for_output(size: Sequence[int], depth: int = 4,
                              padding: str = 'SAME') -> tuple[int, ...]:
  """Smallest valid input whose output covers at least `size` on each side."""
  result = []
  for wanted in size:
    n = 1
    while (_output_length(n, depth, padding) or 0) < wanted:
      n += 1
    result.append(n)
  return tuple(result)


def center_crop(x: jax.Array, height: int, width: int) -> jax.Array:
  """Crops the centre `height` x `width` window of an NHWC array."""
  top = (x.shape[1] - height) // 2
  left = (x.shape[2] - width) // 2
  # lax.slice keeps the crop a static slice also for symbolic sizes (jax.export).
  return jax.lax.slice(x, (0, top, left, 0), (x.shape[0], top + height, left + width, x.shape[3]))


# --------------------------------------------------------------------------
# Layers.


class UpConv2x2(nn.Module):
  """2x2 stride-2 transposed convolution as one matrix product + depth-to-space.

  Each input pixel contributes a disjoint 2x2 output patch, so the layer is a
  per-pixel (C_in -> 4*C_out) matrix product followed by a rearrangement. It
  computes the same function as `nn.ConvTranspose(features, (2, 2), (2, 2))`
  with the same `kernel` of shape (2, 2, C_in, C_out) (tested), but lowers to
  a plain dot instead of a dilated convolution, which is much faster on CPU.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_features = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                         (2, 2, in_features, self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    batch, height, width, _ = x.shape
    # nn.ConvTranspose (transpose_kernel=False) places kernel[1-a, 1-b] at
    # output offset (a, b); flipping keeps the two parameter layouts equal.
    y = jnp.einsum('nhwc,abco->nhawbo', x, kernel[::-1, ::-1])
    y = y.reshape(batch, 2 * height, 2 * width, self.features)
    return y + bias


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 of an NHWC array with even height and width.

  The same function as `nn.max_pool(x, (2, 2), strides=(2, 2))`, written as a
  reshape and a max so that its gradient is an equality mask instead of
  XLA's select-and-scatter: on a 2-core CPU the forward + backward pass at
  32x96x128x32 took 44 ms against 331 ms. Where a window holds tied maxima
  the mask shares the gradient between them (select-and-scatter gives it all
  to the first); in the U-Net ties are zeros from the ReLU in front, whose
  gradient is zero either way, so the network's gradients are the same
  (tested).
  """
  batch, height, width, channels = x.shape
  return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


class ConvBlock(nn.Module):
  """Two 3x3 convolutions, each followed by (optional batch norm and) ReLU."""
  features: int
  padding: str
  use_batch_norm: bool
  dtype: Dtype

  @nn.compact
  def __call__(self, x, *, train: bool):
    for i in range(2):
      # Batch norm subtracts the batch mean, so a bias in front of it has no
      # effect and a zero gradient: only rounding noise, which Adam would
      # scale up to full-size steps.
      x = nn.Conv(self.features, (3, 3), padding=self.padding, dtype=self.dtype,
                  use_bias=not self.use_batch_norm,
                  kernel_init=nn.initializers.he_normal(), name=f'conv{i}')(x)
      if self.use_batch_norm:
        x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype, name=f'bn{i}')(x)
      x = nn.relu(x)
    return x


class UNet(nn.Module):
  """U-Net for semantic segmentation; NHWC input, NHWC logits (float32).

  Attributes:
    num_classes: logits per pixel.
    base_filters: channels of the first block; doubled every block.
    depth: number of pooling steps (contracting blocks).
    padding: 'SAME' (output size = input size) or 'VALID' (the paper).
    dropout_rate: dropout applied after the `dropout_blocks` deepest blocks
      (counting the bottleneck as the deepest), before pooling.
    dropout_blocks: how many of the deepest blocks get dropout.
    use_batch_norm: batch norm after every 3x3 convolution of the blocks
      (which then have no bias).
    upconv_kernel_size: 2 (the paper) or 3 (a 3x3 stride-2 transposed
      convolution with SAME padding, as in the CARLA lab network).
    head_filters: if > 0, one more 3x3 convolution + ReLU with this many
      channels before the 1x1 classifier (the CARLA lab network: 32).
    dtype: computation dtype; parameters stay float32.
  """
  num_classes: int = 23
  base_filters: int = 64
  depth: int = 4
  padding: str = 'SAME'
  dropout_rate: float = 0.0
  dropout_blocks: int = 0
  use_batch_norm: bool = False
  upconv_kernel_size: int = 2
  head_filters: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    if all(isinstance(n, int) for n in x.shape[1:3]):  # symbolic sizes: jax.export checks them
      check_input_size(x.shape[1:3], self.depth, self.padding)
    if self.upconv_kernel_size not in (2, 3):
      raise ValueError(f'upconv_kernel_size must be 2 or 3, got {self.upconv_kernel_size}')
    if self.upconv_kernel_size == 3 and self.padding != 'SAME':
      raise ValueError('upconv_kernel_size=3 is only defined with SAME padding')
    block = functools.partial(ConvBlock, padding=self.padding,
                              use_batch_norm=self.use_batch_norm, dtype=self.dtype)
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    first_dropout_level = self.depth + 1 - self.dropout_blocks  # level depth = bottleneck

    x = x.astype(self.dtype)
    skips = []
    for level in range(self.depth):
      x = block(self.base_filters * 2**level, name=f'down{level}')(x, train=train)
      if self.dropout_rate and level >= first_dropout_level:
        x = dropout(x)
      skips.append(x)
      x = max_pool_2x2(x)

    x = block(self.base_filters * 2**self.depth, name='bottleneck')(x, train=train)
    if self.dropout_rate and self.depth >= first_dropout_level:
      x = dropout(x)

    for level in reversed(range(self.depth)):
      features = self.base_filters * 2**level
      if self.upconv_kernel_size == 2:
        x = UpConv2x2(features, dtype=self.dtype, name=f'upconv{level}')(x)
      else:
        x = nn.ConvTranspose(features, (3, 3), strides=(2, 2), padding='SAME',
                             dtype=self.dtype, name=f'upconv{level}')(x)
      skip = center_crop(skips[level], x.shape[1], x.shape[2])
      x = jnp.concatenate([x, skip], axis=-1)
      x = block(features, name=f'up{level}')(x, train=train)

    if self.head_filters:
      x = nn.relu(nn.Conv(self.head_filters, (3, 3), padding=self.padding, dtype=self.dtype,
                          kernel_init=nn.initializers.he_normal(), name='head')(x))
    x = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name='classifier')(x)
    return x.astype(jnp.float32)


class GlobalContext(nn.Module):
  """Image-level context for a feature map (ParseNet; DeepLabv3's image pooling).

  The features averaged over the whole image, a 1x1 convolution + ReLU to
  `features` channels, that vector broadcast to every position and
  concatenated after the input's channels: each position of the output sees
  what the whole frame holds. NHWC in, NHWC out with `features` more channels.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
    context = nn.relu(nn.Conv(self.features, (1, 1), dtype=self.dtype, name='conv')(pooled))
    context = jnp.broadcast_to(context.astype(x.dtype), (*x.shape[:3], self.features))
    return jnp.concatenate([x, context], axis=-1)


class EfficientNetUNet(nn.Module):
  """U-Net with an EfficientNet-Lite encoder; NHWC input in [0, 1], NHWC logits.

  The encoder (`efficientnet.EfficientNetLite`, under 'encoder') sees the
  input normalised as its ImageNet weights expect ((255 x - 127) / 128),
  so the data, evaluation and prediction code feed both U-Nets alike. The
  decoder climbs from stride 32 to stride 1: at each level the paper's 2x2
  up-convolution, concatenation with the encoder's features of that stride
  (none at stride 1), two 3x3 convolutions (with batch norm if
  `use_batch_norm`) + ReLU; then the 1x1 classifier. With
  `global_context_filters`, the stride-32 features carry `GlobalContext`'s
  image-level channels into the first up-convolution. With
  `deep_supervision`, 1x1 classifiers on the decoder's features at strides 8,
  4 and 2 give auxiliary logits in training (`AUX_STRIDES`; sown into the
  'intermediates' collection, the returned logits unchanged). Sides must be
  multiples of 32; the output has the input's size.

  Attributes:
    num_classes: logits per pixel.
    encoder: the encoder's variant, 'lite0', 'lite1' or 'lite2'.
    decoder_filters: channels of the decoder levels at strides 16, 8, 4, 2, 1.
    use_batch_norm: batch norm in the decoder blocks.
    dropout_rate: dropout on the stride-32 features in training.
    frozen_encoder_batch_norm: the encoder's batch norm uses its running
      statistics in training too and never updates them.
    encoder_drop_path_rate: stochastic depth of the encoder's residual blocks
      in training (`efficientnet.EfficientNetLite.drop_path_rate`).
    global_context_filters: channels of the image-level context added to the
      stride-32 features (`GlobalContext`); 0 adds none.
    deep_supervision: the auxiliary classifiers (`aux_head_name`); they are
      made at initialisation and run only in training.
    dtype: computation dtype; parameters stay float32.
  """
  num_classes: int = 23
  encoder: str = 'lite0'
  decoder_filters: Sequence[int] = (256, 128, 64, 32, 16)
  use_batch_norm: bool = True
  dropout_rate: float = 0.0
  frozen_encoder_batch_norm: bool = False
  encoder_drop_path_rate: float = 0.0
  global_context_filters: int = 0
  deep_supervision: bool = False
  dtype: Dtype = jnp.float32

  # The size rule in UNet's terms (sides multiples of 2**depth, SAME), for
  # code that rounds sizes for either network (test-time augmentation).
  @property
  def depth(self) -> int:
    return 5

  @property
  def padding(self) -> str:
    return 'SAME'

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    if len(self.decoder_filters) != 5:
      raise ValueError(f'decoder_filters needs 5 widths (strides 16 to 1), got '
                       f'{tuple(self.decoder_filters)}')
    skips = efficientnet.EfficientNetLite(
        self.encoder, frozen_batch_norm=self.frozen_encoder_batch_norm,
        drop_path_rate=self.encoder_drop_path_rate, dtype=self.dtype,
        name='encoder')(efficientnet.normalize(x), train=train)
    x = skips.pop()
    if self.global_context_filters:
      x = GlobalContext(self.global_context_filters, dtype=self.dtype, name='context')(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    for level, features in zip(reversed(range(5)), self.decoder_filters):
      x = UpConv2x2(features, dtype=self.dtype, name=f'upconv{level}')(x)
      if level:
        x = jnp.concatenate([x, skips[level - 1].astype(x.dtype)], axis=-1)
      x = ConvBlock(features, 'SAME', self.use_batch_norm, self.dtype,
                    name=f'up{level}')(x, train=train)
      stride = 2**level
      if self.deep_supervision and stride in AUX_STRIDES and (train or self.is_initializing()):
        aux = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name=aux_head_name(stride))(x)
        self.sow('intermediates', aux_logits_name(stride), aux.astype(jnp.float32))
    x = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name='classifier')(x)
    return x.astype(jnp.float32)


# The decoder strides that deep supervision adds a classifier to, finest first.
AUX_STRIDES = (2, 4, 8)


def aux_head_name(stride: int) -> str:
  """The parameters' name of the auxiliary classifier at `stride`."""
  return f'aux_classifier_stride{stride}'


def aux_logits_name(stride: int) -> str:
  """The name of its logits in the 'intermediates' collection."""
  return f'aux_logits_stride{stride}'


EFFICIENTNETS = tuple(f'efficientnet_{variant}' for variant in efficientnet.VARIANTS)
ENCODERS = ('unet', *EFFICIENTNETS)


def encoder_name(model_config) -> str:
  """The config's encoder; configs written before the field existed are 'unet'."""
  encoder = model_config.get('encoder', 'unet')
  if encoder not in ENCODERS:
    raise ValueError(f'model.encoder must be one of {ENCODERS}, got {encoder!r}')
  return encoder


def encoder_variant(model_config) -> str:
  """The EfficientNet variant ('lite0', 'lite1', 'lite2') of an EfficientNet U-Net's config."""
  encoder = encoder_name(model_config)
  if encoder == 'unet':
    raise ValueError("the seed U-Net (model.encoder='unet') has no EfficientNet variant")
  return encoder.removeprefix('efficientnet_')


def label_size(model_config, image_size: Sequence[int]) -> tuple[int, ...]:
  """The logits' (and labels') spatial size for an input of `image_size`.

  Raises ValueError naming the size and the rule where the model of
  `model_config` cannot take it.
  """
  if encoder_name(model_config) == 'unet':
    return output_size(image_size, model_config.depth, model_config.padding)
  stride = efficientnet.STRIDE
  bad = []
  for axis, length in zip(('height', 'width'), image_size):
    if length <= 0 or length % stride:
      nearest = [n for n in (length // stride * stride, (length // stride + 1) * stride) if n > 0]
      bad.append(f'{axis} {length} (nearest valid: {" or ".join(map(str, nearest))})')
  if bad:
    raise ValueError(f'the EfficientNet-Lite U-Net cannot take an input of size '
                     f'{tuple(image_size)}: {"; ".join(bad)}. Each side must be a multiple '
                     f'of {stride}.')
  return tuple(int(n) for n in image_size)


def unet_from_config(model_config) -> nn.Module:
  """Builds the U-Net that the config's `model` section describes."""
  if encoder_name(model_config) != 'unet':
    return EfficientNetUNet(
        num_classes=model_config.num_classes,
        encoder=encoder_variant(model_config),
        decoder_filters=tuple(model_config.decoder_filters),
        use_batch_norm=model_config.use_batch_norm,
        dropout_rate=model_config.dropout_rate,
        frozen_encoder_batch_norm=model_config.frozen_encoder_batch_norm,
        # Workdirs written before the field existed trained without it.
        encoder_drop_path_rate=model_config.get('encoder_drop_path_rate', 0.0),
        global_context_filters=model_config.get('global_context_filters', 0),
        deep_supervision=model_config.get('deep_supervision', 0.0) > 0,
        dtype=jnp.dtype(model_config.dtype),
    )
  return UNet(
      num_classes=model_config.num_classes,
      base_filters=model_config.base_filters,
      depth=model_config.depth,
      padding=model_config.padding,
      dropout_rate=model_config.dropout_rate,
      dropout_blocks=model_config.dropout_blocks,
      use_batch_norm=model_config.use_batch_norm,
      upconv_kernel_size=model_config.upconv_kernel_size,
      head_filters=model_config.head_filters,
      dtype=jnp.dtype(model_config.dtype),
  )
