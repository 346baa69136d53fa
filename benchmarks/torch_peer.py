"""The same U-Net in PyTorch, for the speed comparison in `benchmarks.train_speed`.

Layer for layer the network of `unet_jax.models.UNet`: two 3x3 convolutions +
ReLU per block, 2x2 max pooling, a 2x2 stride-2 `ConvTranspose2d` halving the
channels, concatenation [up-convolution, skip], a 1x1 classifier, dropout in
the deepest blocks. The benchmark checks that both have the same number of
parameters before it times anything.

PyTorch is the optional extra `peer` (`pip install -e '.[peer]'`); only the
benchmark's `--peer=torch` path imports this module.
"""

import time

import torch
from torch import nn
from torch.nn import functional as F


class ConvBlock(nn.Sequential):
  """Two 3x3 convolutions, each followed by (optional batch norm and) ReLU."""

  def __init__(self, in_channels: int, features: int, padding: int, use_batch_norm: bool):
    layers = []
    for i in range(2):
      layers.append(nn.Conv2d(in_channels if i == 0 else features, features, 3, padding=padding,
                              bias=not use_batch_norm))
      if use_batch_norm:
        layers.append(nn.BatchNorm2d(features))
      layers.append(nn.ReLU(inplace=True))
    super().__init__(*layers)


def _center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
  top = (x.shape[2] - height) // 2
  left = (x.shape[3] - width) // 2
  return x[:, :, top:top + height, left:left + width]


class UNet(nn.Module):
  """NCHW U-Net with the fields of `unet_jax.models.UNet` (2x2 up-convolutions)."""

  def __init__(self, *, in_channels: int, num_classes: int, base_filters: int, depth: int,
               padding: str, dropout_rate: float, dropout_blocks: int, use_batch_norm: bool):
    super().__init__()
    pad = {'SAME': 1, 'VALID': 0}[padding]
    self.depth = depth
    self.first_dropout_level = depth + 1 - dropout_blocks  # level `depth` = bottleneck
    self.dropout = nn.Dropout(dropout_rate) if dropout_rate else nn.Identity()
    self.down = nn.ModuleList()
    channels = in_channels
    for level in range(depth):
      self.down.append(ConvBlock(channels, base_filters * 2**level, pad, use_batch_norm))
      channels = base_filters * 2**level
    self.bottleneck = ConvBlock(channels, base_filters * 2**depth, pad, use_batch_norm)
    self.upconv = nn.ModuleList()
    self.up = nn.ModuleList()
    for level in reversed(range(depth)):
      features = base_filters * 2**level
      self.upconv.append(nn.ConvTranspose2d(2 * features, features, 2, stride=2))
      self.up.append(ConvBlock(2 * features, features, pad, use_batch_norm))
    self.classifier = nn.Conv2d(base_filters, num_classes, 1)
    for module in self.modules():
      if isinstance(module, nn.Conv2d) and module is not self.classifier:
        nn.init.kaiming_normal_(module.weight, nonlinearity='relu')
        if module.bias is not None:
          nn.init.zeros_(module.bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    skips = []
    for level, block in enumerate(self.down):
      x = block(x)
      if level >= self.first_dropout_level:
        x = self.dropout(x)
      skips.append(x)
      x = F.max_pool2d(x, 2, 2)
    x = self.bottleneck(x)
    if self.depth >= self.first_dropout_level:
      x = self.dropout(x)
    for upconv, block, skip in zip(self.upconv, self.up, reversed(skips)):
      x = upconv(x)
      x = torch.cat([x, _center_crop(skip, x.shape[2], x.shape[3])], dim=1)
      x = block(x)
    return self.classifier(x)


def unet_from_config(model_config, in_channels: int = 3) -> UNet:
  if model_config.upconv_kernel_size != 2 or model_config.head_filters:
    raise ValueError('the PyTorch peer is the paper U-Net: upconv_kernel_size=2, head_filters=0')
  return UNet(in_channels=in_channels, num_classes=model_config.num_classes,
              base_filters=model_config.base_filters, depth=model_config.depth,
              padding=model_config.padding, dropout_rate=model_config.dropout_rate,
              dropout_blocks=model_config.dropout_blocks,
              use_batch_norm=model_config.use_batch_norm)


def parameter_count(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def create_train_step(model: nn.Module, learning_rate: float, *, compile_model: bool,
                      autocast_dtype: torch.dtype | None = None):
  """A step function `step(images, labels) -> loss` (Adam, cross-entropy).

  With `compile_model` the model goes through `torch.compile`; its first call
  then pays the compilation. With `autocast_dtype` (bfloat16 for mixed
  precision) the forward pass runs under `torch.autocast` on the model's
  device, the loss in float32, as unet_jax's `model.dtype='bfloat16'` does.
  """
  optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
  forward = torch.compile(model) if compile_model else model
  device_type = next(model.parameters()).device.type

  def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
      logits = forward(images)
    loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()

  return step


def to_torch_batch(images, labels, channels_last: bool, device: str = 'cpu'):
  """NHWC numpy images and NHW labels -> NCHW float tensor (optionally
  channels_last in memory) and int64 labels, on `device`."""
  x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
  x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
  return x, torch.from_numpy(labels).long().to(device)


def timed_call(step, images, labels) -> float:
  """Seconds of one step; `loss.item()` waits for the step to finish."""
  start = time.perf_counter()
  step(images, labels).item()
  return time.perf_counter() - start
