"""Checks a config before anything starts, naming the field that is wrong."""

from unet_jax import models


class ConfigError(ValueError):
  pass


def check_config(config, num_devices: int) -> None:
  problems = []

  def require(condition: bool, message: str):
    if not condition:
      problems.append(message)

  require(config.learning_rate > 0, f'learning_rate must be > 0, got {config.learning_rate}')
  require(config.batch_size > 0, f'batch_size must be > 0, got {config.batch_size}')
  if config.batch_size > 0:
    require(config.batch_size % num_devices == 0,
            f'batch_size {config.batch_size} is not divisible by the {num_devices} devices')
  require(config.num_epochs > 0, f'num_epochs must be > 0, got {config.num_epochs}')
  require(config.weight_decay >= 0, f'weight_decay must be >= 0, got {config.weight_decay}')
  require(config.grad_clip_norm >= 0, f'grad_clip_norm must be >= 0, got {config.grad_clip_norm}')
  require(config.warmup_epochs >= 0, f'warmup_epochs must be >= 0, got {config.warmup_epochs}')
  for name in ('log_every_steps', 'checkpoint_every_steps', 'eval_every_epochs', 'max_to_keep'):
    require(config[name] >= 1, f'{name} must be >= 1, got {config[name]}')
  require(2 <= config.model.num_classes <= 256,
          f'model.num_classes must be in [2, 256] (masks are uint8), got {config.model.num_classes}')
  require(config.model.base_filters >= 1,
          f'model.base_filters must be >= 1, got {config.model.base_filters}')
  require(config.model.depth >= 1, f'model.depth must be >= 1, got {config.model.depth}')
  require(0 <= config.model.dropout_rate < 1,
          f'model.dropout_rate must be in [0, 1), got {config.model.dropout_rate}')
  require(config.model.dtype in ('float32', 'bfloat16', 'float16'),
          f"model.dtype must be 'float32', 'bfloat16' or 'float16', got {config.model.dtype!r}")
  require(config.eval_split in ('validation', 'test', 'train'),
          f"eval_split must be 'validation', 'test' or 'train', got {config.eval_split!r}")
  encoder = config.model.get('encoder', 'unet')
  require(encoder in models.ENCODERS,
          f'model.encoder must be one of {models.ENCODERS}, got {encoder!r}')
  multiplier = config.get('encoder_learning_rate_multiplier', 1.0)
  require(multiplier >= 0, f'encoder_learning_rate_multiplier must be >= 0, got {multiplier}')
  if encoder == 'efficientnet_lite0':
    require(config.model.padding == 'SAME',
            f"model.padding must be 'SAME' with encoder {encoder}, got {config.model.padding!r}")
    filters = tuple(config.model.decoder_filters)
    require(len(filters) == 5 and all(n >= 1 for n in filters),
            f'model.decoder_filters must be 5 positive widths, got {filters}')
  elif encoder == 'unet':
    require(not config.model.get('pretrained', False),
            "model.pretrained needs model.encoder='efficientnet_lite0'")
    require(multiplier == 1.0, "encoder_learning_rate_multiplier needs "
            "model.encoder='efficientnet_lite0'")
  if config.model.depth >= 1 and encoder in models.ENCODERS:
    try:
      models.label_size(config.model, config.data.image_size)
    except ValueError as error:
      problems.append(f'data.image_size: {error}')
  if problems:
    raise ConfigError('invalid config: ' + '; '.join(problems))
