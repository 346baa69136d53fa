"""Checks a config before anything starts, naming every field that is wrong.

`RULES` is the one table of what each field may hold: a field's dotted path
and a rule made by one of the small constructors below (`integer`,
`number`, `one_of`, `pair`, ...). A new config field gets its line here.
Rules that tie fields together follow in `check_config`. Nothing is read
or written before these checks pass.
"""

from collections.abc import Callable
import math

from unet_jax import classes
from unet_jax import errors
from unet_jax import models

NEEDS_EFFICIENTNET = f'an EfficientNet encoder (model.encoder one of {models.EFFICIENTNETS})'

# (test, what the value must be); the test never raises.
Rule = tuple[Callable[[object], bool], str]


class ConfigError(errors.UserError, ValueError):
  pass


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bounds(low, high, low_open: bool, high_open: bool) -> tuple[Callable, str]:
  def within(value):
    return ((low is None or (value > low if low_open else value >= low)) and
            (high is None or (value < high if high_open else value <= high)))
  if low is not None and high is not None:
    text = f'in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
  elif low is not None:
    text = f'{">" if low_open else ">="} {low}'
  elif high is not None:
    text = f'{"<" if high_open else "<="} {high}'
  else:
    text = ''
  return within, text


def integer(low=None, high=None) -> Rule:
  """An int (not a bool) in [low, high]."""
  within, text = _bounds(low, high, False, False)
  return (lambda v: _is_int(v) and within(v)), f'an integer {text}'.strip()


def number(low=None, high=None, *, low_open=False, high_open=False) -> Rule:
  """A finite int or float between the bounds (closed unless said open)."""
  within, text = _bounds(low, high, low_open, high_open)
  return (lambda v: _is_number(v) and within(v)), f'a finite number {text}'.strip()


def one_of(*choices) -> Rule:
  return (lambda v: any(v == c and type(v) is type(c) for c in choices),
          'one of ' + ', '.join(repr(c) for c in choices))


def boolean() -> Rule:
  return (lambda v: isinstance(v, bool)), 'True or False'


def string() -> Rule:
  return (lambda v: isinstance(v, str)), 'a string'


def pair(element: Rule, extra: Callable[[tuple], bool] = lambda p: True,
         extra_text: str = '') -> Rule:
  """A 2-tuple (or list) whose two elements satisfy `element`, and `extra` on the pair."""
  test, text = element
  return ((lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(test(x) for x in v)
           and extra(tuple(v))),
          f'a pair of values, each {text}{extra_text}')


def empty_or(rule: Rule) -> Rule:
  """() (off) or a value that satisfies `rule`."""
  test, text = rule
  return (lambda v: (isinstance(v, (tuple, list)) and len(v) == 0) or test(v)), f'() or {text}'


def class_names() -> Rule:
  return ((lambda v: isinstance(v, (tuple, list)) and all(c in classes.CLASS_NAMES for c in v)),
          'a tuple of class names (' + ', '.join(classes.CLASS_NAMES) + ')')


RULES: dict[str, Rule] = {
    'seed': integer(),
    # ---- model ----
    'model.num_classes': integer(2, 256),  # masks are uint8
    'model.base_filters': integer(1),
    'model.depth': integer(1),
    'model.padding': one_of('SAME', 'VALID'),
    'model.dropout_rate': number(0, 1, high_open=True),
    'model.dropout_blocks': integer(0),
    'model.use_batch_norm': boolean(),
    'model.upconv_kernel_size': one_of(2, 3),
    'model.head_filters': integer(0),
    'model.dtype': one_of('float32', 'bfloat16', 'float16'),
    'model.encoder': one_of(*models.ENCODERS),
    'model.pretrained': boolean(),
    'model.decoder_filters': (lambda v: isinstance(v, (tuple, list)) and len(v) == 5 and
                              all(_is_int(n) and n >= 1 for n in v), '5 positive integer widths'),
    'model.frozen_encoder_batch_norm': boolean(),
    'model.encoder_drop_path_rate': number(0, 1, high_open=True),
    'model.global_context_filters': integer(0),
    'model.deep_supervision': number(0),
    # ---- data ----
    'data.data_dir': string(),
    'data.synthetic_scenes': integer(0),
    'data.prepared_dir': string(),
    'data.image_size': pair(integer(1)),
    'data.split_key': one_of('recording', 'name'),
    'data.validation_fraction': number(0, 1, high_open=True),
    'data.test_fraction': number(0, 1, high_open=True),
    'data.validation_groups': (lambda v: isinstance(v, (tuple, list)) and
                               all(isinstance(g, str) and g for g in v) and len(set(v)) == len(v),
                               'distinct non-empty strings (group keys, e.g. recordings)'),
    'data.exclude_frames': (lambda v: isinstance(v, (tuple, list)) and
                            all(isinstance(n, str) and n for n in v) and len(set(v)) == len(v),
                            "distinct non-empty strings (frame names, e.g. ('000034', '011478'))"),
    'data.exclude_groups': (lambda v: isinstance(v, (tuple, list)) and
                            all(isinstance(g, str) and g for g in v) and len(set(v)) == len(v),
                            "distinct non-empty strings (group keys, e.g. recordings ('000', '007'))"),
    'data.skip_bad_pairs': boolean(),
    'data.device_cache': one_of('auto', 'always', 'never'),
    'data.device_cache_max_mb': number(0),
    'data.prefetch_batches': integer(1),
    'data.num_workers': integer(0),
    'data.augment.horizontal_flip': boolean(),
    'data.augment.scale_range': pair(number(0, low_open=True), lambda p: p[0] <= p[1],
                                     ', the first <= the second'),
    'data.augment.brightness': number(0, 1),
    'data.augment.contrast': number(0, 1),
    'data.augment.saturation': number(0, 1),
    'data.augment.copy_paste': number(0, 1),
    'data.augment.rare_windows': number(0, 1),
    'data.train_crop_size': empty_or(pair(integer(1))),
    'data.rare_classes': class_names(),
    'data.rare_boost': number(0),
    'data.train_splits': (lambda v: isinstance(v, (tuple, list)) and len(v) >= 1 and
                          len(set(v)) == len(v) and 'train' in v and
                          all(s in ('train', 'validation', 'test') for s in v),
                          "distinct split names, 'train' among them, each of 'train', "
                          "'validation', 'test'"),
    # ---- optimisation ----
    'batch_size': integer(1),
    'num_epochs': integer(1),
    'optimizer': one_of('adam', 'adamw', 'sgd'),
    'learning_rate': number(0, low_open=True),
    'lr_schedule': one_of('constant', 'cosine'),
    'warmup_epochs': number(0),
    'weight_decay': number(0),
    'grad_clip_norm': number(0),
    'momentum': number(0, 1, high_open=True),
    'ignore_label': integer(-1, 255),
    'class_weighting': one_of('none', 'inverse', 'median'),
    'class_weight_max': number(0, low_open=True),
    'lovasz_weight': number(0),
    'hard_pixel_fraction': number(0, 1, low_open=True),
    'ema_decay': number(0, 1, high_open=True),
    'encoder_learning_rate_multiplier': number(0),
    'init_from': string(),
    'init_checkpoint': (lambda v: isinstance(v, str) and (v in ('best', 'latest') or
                                                           (v.isascii() and v.isdigit())),
                        "'best', 'latest' or a step"),
    # ---- loop ----
    'log_every_steps': integer(1),
    'eval_every_epochs': integer(1),
    'checkpoint_every_steps': integer(1),
    'max_to_keep': integer(1),
    'eval_split': one_of('validation', 'test', 'train'),
    'distributed': one_of('auto', 'on', 'off'),
    # ---- inference ----
    'inference.eval_size': empty_or(pair(integer(1))),
    'inference.tta_flip': boolean(),
    'inference.tta_scales': (lambda v: isinstance(v, (tuple, list)) and len(v) >= 1 and
                             all(_is_number(s) and s > 0 for s in v),
                             'a tuple of finite numbers > 0, at least one'),
    'inference.prior_correction': number(0),
}

_MISSING = object()


def _get(config, path: str):
  value = config
  for key in path.split('.'):
    try:
      value = value[key]
    except (KeyError, TypeError):
      return _MISSING
  return value


def field_problems(config, rules: dict[str, Rule] = RULES) -> list[str]:
  """One line per field that breaks its rule (or is missing)."""
  problems = []
  for path, (test, requirement) in rules.items():
    value = _get(config, path)
    if value is _MISSING:
      problems.append(f'{path} is missing')
    elif not test(value):
      problems.append(f'{path} must be {requirement}, got {value!r}')
  return problems


def check_fields(config) -> None:
  """Raises ConfigError naming every field that breaks its rule; needs no devices."""
  problems = field_problems(config)
  if problems:
    raise ConfigError('invalid config: ' + '; '.join(problems))


def check_config(config, num_devices: int) -> None:
  """Raises ConfigError naming every field that is wrong; reads and writes nothing."""
  problems = field_problems(config)
  bad = {p.split(' ')[0] for p in problems}

  def require(condition: bool, message: str):
    if not condition:
      problems.append(message)

  if 'batch_size' not in bad:
    require(config.batch_size % num_devices == 0,
            f'batch_size {config.batch_size} is not divisible by the {num_devices} devices')
  if not bad & {'data.validation_fraction', 'data.test_fraction'}:
    require(config.data.validation_fraction + config.data.test_fraction < 1,
            'data.validation_fraction + data.test_fraction must be < 1 (training needs frames), '
            f'got {config.data.validation_fraction} + {config.data.test_fraction}')
  if not bad & {'data.validation_fraction', 'data.test_fraction', 'data.train_splits',
                'eval_split'}:
    named = 'data.validation_groups' not in bad and bool(config.data.validation_groups)
    fractions = {'train': 1.0, 'validation': 1.0 if named else config.data.validation_fraction,
                 'test': config.data.test_fraction}
    for split in config.data.train_splits:
      require(fractions[split] > 0,
              f'data.train_splits names {split!r}, but data.{split}_fraction is 0')
    require(fractions[config.eval_split] > 0,
            f'eval_split is {config.eval_split!r}, but data.{config.eval_split}_fraction is 0')
  if not bad & {'model.upconv_kernel_size', 'model.padding'}:
    require(config.model.upconv_kernel_size == 2 or config.model.padding == 'SAME',
            'model.upconv_kernel_size=3 needs model.padding=\'SAME\'')
  encoder = config.model.encoder
  if encoder in models.EFFICIENTNETS:
    require(config.model.padding == 'SAME',
            f"model.padding must be 'SAME' with encoder {encoder}, got {config.model.padding!r}")
  elif encoder == 'unet':
    require(not config.model.pretrained,
            f'model.pretrained needs {NEEDS_EFFICIENTNET}')
    require(config.encoder_learning_rate_multiplier == 1.0,
            f'encoder_learning_rate_multiplier needs {NEEDS_EFFICIENTNET}')
    require('model.encoder_drop_path_rate' in bad or config.model.encoder_drop_path_rate == 0,
            f'model.encoder_drop_path_rate needs {NEEDS_EFFICIENTNET}')
    require('model.global_context_filters' in bad or config.model.global_context_filters == 0,
            f'model.global_context_filters needs {NEEDS_EFFICIENTNET}')
    require('model.deep_supervision' in bad or config.model.deep_supervision == 0,
            f'model.deep_supervision needs {NEEDS_EFFICIENTNET}')
  if not bad & {'data.image_size', 'model.depth', 'model.padding', 'model.encoder',
                'model.decoder_filters'}:
    try:
      models.label_size(config.model, config.data.image_size)
    except ValueError as error:
      problems.append(f'data.image_size: {error}')
  if config.model.padding == 'VALID':
    require('inference.eval_size' in bad or not config.inference.eval_size,
            "inference.eval_size must be () with model.padding='VALID' (unpadded "
            f'convolutions predict a smaller centre), got {config.inference.eval_size!r}')
    require('inference.tta_scales' in bad or tuple(config.inference.tta_scales) == (1.0,),
            "inference.tta_scales must be (1.0,) with model.padding='VALID', got "
            f'{config.inference.tta_scales!r}')
  if config.data.train_crop_size and not bad & {'data.train_crop_size', 'model.depth',
                                                'model.padding', 'model.encoder'}:
    try:
      models.label_size(config.model, config.data.train_crop_size)
    except ValueError as error:
      problems.append(f'data.train_crop_size: {error}')
  if problems:
    raise ConfigError('invalid config: ' + '; '.join(problems))
