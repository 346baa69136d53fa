"""Several trained models scored as one: their class probabilities averaged.

`evaluate` and `predict` take `--ensemble=DIR[,DIR...]`, other training
workdirs whose models run beside `--workdir`'s on every frame. Each member
is restored from its own workdir (`restore`) and runs with the test-time
augmentation and prior correction the command settled on (the flags, else
the first workdir's `inference` field), at its own training size
(`apply_function`); `average` turns their apply functions into one: the log
of the members' mean probabilities, whose argmax is the ensemble's
prediction. Models of different seeds of one config make the usual
ensemble; models of different configs may join as long as they label the
same classes the same way and trained on the same frames (`check`).

One member is the model alone: `average` then returns its outputs
untouched, so a command without `--ensemble` scores exactly as before.
"""

from collections.abc import Callable, Sequence
import dataclasses
import hashlib
import pathlib

import jax
import jax.numpy as jnp

from unet_jax import checkpointing
from unet_jax import errors
from unet_jax import models
from unet_jax import prior_correction
from unet_jax import tta

# What decides which frames a run trained on (carla_dataset.assign_splits).
SPLIT_FIELDS = ('split_key', 'validation_fraction', 'test_fraction', 'validation_groups',
                'synthetic_scenes', 'train_splits')


@dataclasses.dataclass
class Member:
  workdir: str
  config: object  # ml_collections.ConfigDict
  variables: dict
  step: int
  model: models.UNet


def restore(workdirs: Sequence[str], checkpoint: str = 'best', sharding=None,
            weight_average: bool = True) -> list[Member]:
  """Each workdir's model at `checkpoint` (checkpointing.restore_model)."""
  members = []
  for workdir in workdirs:
    config, variables, step = checkpointing.restore_model(
        workdir, checkpoint, sharding=sharding, weight_average=weight_average)
    members.append(Member(str(workdir), config, variables, step,
                          models.unet_from_config(config.model)))
  return members


def parse_workdirs(value) -> list[str]:
  """'a,b' or a list -> ['a', 'b'], empty entries dropped; None -> []."""
  if value is None:
    return []
  parts = value.split(',') if isinstance(value, str) else list(value)
  return [str(p).strip() for p in parts if str(p).strip()]


def _split_definition(config) -> dict:
  data = config.data
  definition = {field: data.get(field) for field in SPLIT_FIELDS}
  definition['validation_groups'] = sorted(definition['validation_groups'] or ())
  definition['train_splits'] = sorted(definition['train_splits'] or ('train',))
  definition['data_dir'] = str(pathlib.Path(data.data_dir).resolve())
  return definition


def check(members: Sequence[Member], scored_split: str | None = None) -> None:
  """A clear error where the members cannot be averaged, or, when a split
  of the first member's data is scored (`scored_split`; None for a folder),
  where another member trained on other frames than the first: its score
  could then count frames it learned from. (Models trained on the scored
  split itself, `data.train_splits`, are scored as one of them alone is:
  not held out, as training says.)

  Every member must predict the same number of classes with the same ignore
  label and padding; VALID-padded members also the same depth and input
  size, so that their outputs cover the same pixels.
  """
  first = members[0]
  if len({str(pathlib.Path(m.workdir).resolve()) for m in members}) < len(members):
    raise errors.UserError('--ensemble names a workdir twice (or --workdir again): each model '
                           'counts once')
  for member in members[1:]:
    for what, mine, theirs in (
        ('model.num_classes', member.config.model.num_classes, first.config.model.num_classes),
        ('ignore_label', member.config.ignore_label, first.config.ignore_label),
        ('model.padding', member.config.model.padding, first.config.model.padding)):
      if mine != theirs:
        raise errors.UserError(f'{member.workdir}: {what} is {mine!r} against {theirs!r} in '
                               f'{first.workdir}: their predictions cannot be averaged')
    if first.config.model.padding != 'SAME':
      for what, mine, theirs in (
          ('model.depth', member.config.model.depth, first.config.model.depth),
          ('data.image_size', tuple(member.config.data.image_size),
           tuple(first.config.data.image_size))):
        if mine != theirs:
          raise errors.UserError(
              f'{member.workdir}: {what} is {mine!r} against {theirs!r} in {first.workdir}: '
              'VALID-padded models average only with the same output geometry')
  if scored_split is None:
    return
  theirs = _split_definition(first.config)
  for member in members[1:]:
    mine = _split_definition(member.config)
    differing = [f'data.{field}' for field in mine if mine[field] != theirs[field]]
    if differing:
      raise errors.UserError(
          f'{member.workdir}: trained on another split of the data than {first.workdir} '
          f'({", ".join(differing)} differ), so its {scored_split} score could include frames '
          'it trained on; score a folder of frames none of them trained on (--data_dir)')


def average(apply_fns: Sequence[Callable]) -> Callable:
  """One apply function `(variables, images, *, train=False)` over a tuple of
  the members' variables: the log of their mean class probabilities.

  Each member's outputs are logits or log-probabilities [B, h, w, C]; a
  single member's are returned untouched.
  """
  apply_fns = tuple(apply_fns)
  if not apply_fns:
    raise ValueError('an ensemble needs at least one model')

  def apply(variables, images, *, train: bool = False):
    del train  # an ensemble is an evaluation-time device
    if len(variables) != len(apply_fns):
      raise ValueError(f'{len(variables)} sets of variables for {len(apply_fns)} models')
    if len(apply_fns) == 1:
      return apply_fns[0](variables[0], images, train=False)
    total = 0.0
    for apply_fn, member_variables in zip(apply_fns, variables):
      logits = apply_fn(member_variables, images, train=False)
      total = total + jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.log(total / len(apply_fns))

  return apply


def apply_function(members: Sequence[Member], flip: bool, scales, prior: float,
                   frame_size=None, hint: str = '') -> Callable:
  """`average` of the members, each with the test-time views (unet_jax.tta)
  and its own class-weight prior taken out at strength `prior`
  (unet_jax.prior_correction); apply it to the tuple of their variables.

  frame_size: (height, width) of the frames it will be given, when they are
  not at the members' training size: each member then sees its views at its
  own `data.image_size` and its probabilities come back to the frames'
  pixels. hint: added to the error of a VALID-padded member that cannot do that.
  """
  apply_fns = []
  for member in members:
    member_size = tuple(int(n) for n in member.config.data.image_size)
    model_size = None if frame_size is None or tuple(frame_size) == member_size else member_size
    try:
      member_apply = tta.from_flags(member.model, flip, scales, model_size=model_size)
    except ValueError as error:  # another size or scales for a VALID-padded model
      raise errors.UserError(f'{member.workdir}: {error}{hint}') from None
    apply_fns.append(prior_correction.for_workdir(member_apply, member.config, member.workdir,
                                                  prior)[0])
  return average(apply_fns)


def tag(members: Sequence[Member]) -> str:
  """'' for one model; else '-ensemble<N>_<8 hex digits of the members' paths>'
  for a report folder's name: each ensemble keeps its own report."""
  if len(members) == 1:
    return ''
  paths = '\n'.join(str(pathlib.Path(m.workdir).resolve()) for m in members)
  return f'-ensemble{len(members)}_{hashlib.sha256(paths.encode()).hexdigest()[:8]}'


def describe(members: Sequence[Member]) -> list[dict]:
  """The members as JSON-ready records: workdir and checkpoint step."""
  return [{'workdir': m.workdir, 'step': int(m.step)} for m in members]
