"""EfficientNet-Lite0, -Lite1 and -Lite2 (Tan & Le 2019; the Lite variants of
TensorFlow's official models) as a Flax linen feature encoder.

The Lite variant is EfficientNet-B0 made for mobile accelerators: ReLU6
instead of swish, no squeeze-and-excitation, and a fixed 32-channel stem.
Stem: 3x3 stride-2 convolution, batch norm, ReLU6. Then 16 inverted
bottleneck (MBConv) blocks in 7 stages: 1x1 expansion (by 6; none in the
first stage), batch norm, ReLU6, a depthwise k x k convolution (stride 2 at
the first block of a stage that downsamples), batch norm, ReLU6, a 1x1
projection and batch norm, with the input added where the block keeps
stride and channels. Convolutions have no bias; batch norm uses epsilon
1e-3 and momentum 0.99 (TensorFlow's). Every convolution pads as
TensorFlow's 'SAME' (`nn.Conv(padding='SAME')` computes the same pads):
on stride 2 over an even side the extra pixel goes after, so a 3x3 kernel
pads (0, 1) and a 5x5 kernel (1, 2).

Lite1 repeats the blocks of stages 2 to 6 more often (21 blocks against
16), and Lite2 has those 21 blocks and wider stages 3 to 7 (`STAGES`); the
stem, the first and the last stage are the same in all three. They were
trained on ImageNet at 224, 240 and 260 pixels (top-1 75.1%, 76.7% and
77.6% in TensorFlow's release).

The classifier head (1x1 convolution to 1280 channels, pooling, dense) is
left out: the encoder returns the features at strides 2, 4, 8, 16 and 32,
the ends of stages 1, 2, 3, 5 and 7 (`feature_channels`: 16, 24, 40, 112 and
320 channels for Lite0 and Lite1, 16, 24, 48, 120 and 352 for Lite2), for a
U-Net decoder. Sides must be multiples of 32.

The ImageNet weights expect inputs scaled as the TensorFlow Lite models
were trained: (RGB in [0, 255] - 127) / 128; `normalize` maps [0, 1]
images onto that. Stochastic depth (the original training's drop-connect)
is an option: in training each residual block's branch is dropped for a
whole example with a probability that grows linearly with the block's index,
from 0 at the first block to `drop_path_rate` * 15/16 at the last (20/21 in
Lite1 and Lite2), and kept branches are scaled by 1 / (1 - probability);
evaluation uses every branch.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = jnp.dtype

# (kernel size, stride, expansion, output channels, repeats) per stage.
STAGES = {
    'lite0': ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
              (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)),
    'lite1': ((3, 1, 1, 16, 1), (3, 2, 6, 24, 3), (5, 2, 6, 40, 3), (3, 2, 6, 80, 4),
              (5, 1, 6, 112, 4), (5, 2, 6, 192, 5), (3, 1, 6, 320, 1)),
    'lite2': ((3, 1, 1, 16, 1), (3, 2, 6, 24, 3), (5, 2, 6, 48, 3), (3, 2, 6, 88, 4),
              (5, 1, 6, 120, 4), (5, 2, 6, 208, 5), (3, 1, 6, 352, 1)),
}
VARIANTS = tuple(STAGES)
STEM_FEATURES = 32
# The stages (0-based) whose last block's output is a skip feature, at strides 2 to 32.
FEATURE_STAGES = (0, 1, 2, 4, 6)
STRIDE = 32
BATCH_NORM_EPSILON = 1e-3
INPUT_MEAN = 127.0 / 255.0  # in units of a [0, 1] image
INPUT_SCALE = 128.0 / 255.0


def normalize(images: jax.Array) -> jax.Array:
  """[0, 1] RGB images -> the encoder's input scale, (255 x - 127) / 128."""
  return (images - INPUT_MEAN) / INPUT_SCALE


def drop_path_rates(rate: float, num_blocks: int) -> list[float]:
  """Each block's stochastic-depth probability: rate * index / num_blocks."""
  return [rate * index / num_blocks for index in range(num_blocks)]


def drop_path(branch: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """Zeroes the residual branch of whole examples with probability `rate` and
  scales the others by 1 / (1 - rate), so its expectation is unchanged."""
  keep = jax.random.bernoulli(key, 1.0 - rate, (branch.shape[0],) + (1,) * (branch.ndim - 1))
  return jnp.where(keep, branch / (1.0 - rate), 0).astype(branch.dtype)


def _stages(variant: str):
  if variant not in STAGES:
    raise ValueError(f'EfficientNet variant must be one of {VARIANTS}, got {variant!r}')
  return STAGES[variant]


def block_specs(variant: str = 'lite0') -> list[tuple[int, int, int, int]]:
  """(kernel size, stride, expansion, output channels) of every block in order."""
  specs = []
  for kernel, stride, expansion, features, repeats in _stages(variant):
    for i in range(repeats):
      specs.append((kernel, stride if i == 0 else 1, expansion, features))
  return specs


def feature_blocks(variant: str = 'lite0') -> tuple[int, ...]:
  """Indices of the blocks whose outputs are the features at strides 2 to 32."""
  ends = np.cumsum([repeats for *_, repeats in _stages(variant)]) - 1
  return tuple(int(ends[stage]) for stage in FEATURE_STAGES)


def feature_channels(variant: str = 'lite0') -> tuple[int, ...]:
  """Channels of the features at strides 2, 4, 8, 16 and 32."""
  return tuple(_stages(variant)[stage][3] for stage in FEATURE_STAGES)


class MBConv(nn.Module):
  """Inverted bottleneck without squeeze-and-excitation (the Lite block)."""
  kernel_size: int
  stride: int
  expansion: int
  features: int
  frozen_batch_norm: bool = False
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    def batch_norm(name):
      return nn.BatchNorm(use_running_average=not train or self.frozen_batch_norm,
                          momentum=0.99, epsilon=BATCH_NORM_EPSILON, dtype=self.dtype, name=name)

    inputs = x
    in_features = x.shape[-1]
    hidden = in_features * self.expansion
    if self.expansion != 1:
      x = nn.Conv(hidden, (1, 1), use_bias=False, dtype=self.dtype, name='expand_conv')(x)
      x = nn.relu6(batch_norm('expand_bn')(x))
    x = nn.Conv(hidden, (self.kernel_size, self.kernel_size), strides=self.stride,
                padding='SAME', feature_group_count=hidden, use_bias=False, dtype=self.dtype,
                name='depthwise_conv')(x)
    x = nn.relu6(batch_norm('depthwise_bn')(x))
    x = nn.Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype, name='project_conv')(x)
    x = batch_norm('project_bn')(x)
    if self.stride == 1 and in_features == self.features:
      if train and self.drop_path_rate > 0:
        x = drop_path(x, self.drop_path_rate, self.make_rng('dropout'))
      x = x + inputs
    return x


class EfficientNetLite(nn.Module):
  """The encoder: normalised NHWC images -> features at strides 2, 4, 8, 16, 32.

  Attributes:
    variant: 'lite0', 'lite1' or 'lite2' (`STAGES`).
    frozen_batch_norm: batch norm always uses (and never updates) its
      running statistics, in training too.
    drop_path_rate: stochastic depth of the residual blocks in training (the
      last block's probability approaches it; `drop_path_rates`). Draws from
      the 'dropout' rng stream.
    dtype: computation dtype; parameters stay float32.
  """
  variant: str = 'lite0'
  frozen_batch_norm: bool = False
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool = False) -> list[jax.Array]:
    if x.shape[1] % STRIDE or x.shape[2] % STRIDE:
      raise ValueError(f'EfficientNet-{self.variant.capitalize()} needs sides that are '
                       f'multiples of {STRIDE}, got {tuple(x.shape[1:3])}')
    x = nn.Conv(STEM_FEATURES, (3, 3), strides=2, padding='SAME', use_bias=False,
                dtype=self.dtype, name='stem_conv')(x.astype(self.dtype))
    x = nn.BatchNorm(use_running_average=not train or self.frozen_batch_norm, momentum=0.99,
                     epsilon=BATCH_NORM_EPSILON, dtype=self.dtype, name='stem_bn')(x)
    x = nn.relu6(x)
    features = []
    outputs = set(feature_blocks(self.variant))
    specs = block_specs(self.variant)
    rates = drop_path_rates(self.drop_path_rate, len(specs))
    for index, (kernel, stride, expansion, out) in enumerate(specs):
      x = MBConv(kernel, stride, expansion, out, frozen_batch_norm=self.frozen_batch_norm,
                 drop_path_rate=rates[index], dtype=self.dtype,
                 name=f'block{index}')(x, train=train)
      if index in outputs:
        features.append(x)
    return features
