"""Orbax checkpoints and the workdir's saved config.

A workdir holds `config.json` (the resolved config of the run) and
`checkpoints/<step>/`. Checkpoints are written asynchronously and atomically
(Orbax writes to a temporary folder and renames it when complete, so a
process killed mid-write leaves nothing that `latest_step` would pick), with
the `max_to_keep` latest and the best by validation mean IoU preserved. They
hold arrays only (no pickle).

`restore_model(workdir, checkpoint, sharding)` is the inference side: it
reads a checkpoint's model variables alone, against the model's abstract
shapes, and builds no optimizer. A checkpoint that cannot be read is named
with the steps that remain; resuming skips it (`restore_or_keep`).
"""

import json
import os
import pathlib
import shutil
import tempfile

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from unet_jax import errors
from unet_jax import models
from unet_jax import sharding as sharding_lib

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
# Checkpoints that could not be read are moved here on resume, out of Orbax's
# sight, so that training can write that step again; nothing is deleted.
UNREADABLE_DIR = 'unreadable_checkpoints'
# Below this much free space a run would fail at its first checkpoint, not now.
MIN_FREE_BYTES = 256 * 2**20
# Model fields that configs written before them lack, with the value they meant.
ADDED_MODEL_FIELDS = {'encoder': 'unet', 'pretrained': False, 'frozen_encoder_batch_norm': False,
                      'decoder_filters': (256, 128, 64, 32, 16), 'encoder_drop_path_rate': 0.0,
                      'global_context_filters': 0, 'deep_supervision': 0.0}


class WorkdirError(errors.UserError, ValueError):
  """A workdir, its config.json or one of its checkpoints is missing, unreadable or unwritable."""


def check_writable(folder, what: str = 'workdir') -> None:
  """Creates `folder` if needed and writes a file there, or raises WorkdirError now."""
  path = pathlib.Path(folder)
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix='.write_test_'):
      pass
  except OSError as error:
    raise WorkdirError(f'{what} {folder} is not writable: {error.strerror or error}') from error


def check_workdir(workdir: str) -> None:
  """Fails now, not after an hour, if the workdir cannot take checkpoints."""
  path = pathlib.Path(workdir)
  check_writable(path)
  free = shutil.disk_usage(path).free
  if free < MIN_FREE_BYTES:
    raise WorkdirError(f'workdir {workdir} has only {free / 2**20:.0f} MiB free; checkpoints '
                       f'need at least {MIN_FREE_BYTES / 2**20:.0f} MiB')


def create_manager(workdir: str, config, read_only: bool = False) -> ocp.CheckpointManager:
  """The workdir's checkpoints; read-only for evaluation and prediction, which
  may run beside a training that is writing into the same folder."""
  preservation = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(config.max_to_keep),
      checkpoint_managers.BestN(get_metric_fn=lambda m: m['mean_iou'], n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  # A process killed mid-write leaves a temporary folder; it is never read as a
  # checkpoint, and the next run removes it.
  options = ocp.CheckpointManagerOptions(preservation_policy=preservation,
                                         enable_async_checkpointing=True,
                                         cleanup_tmp_directories=not read_only,
                                         read_only=read_only, create=not read_only)
  return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / CHECKPOINT_DIR,
                               options=options)


def state_arrays(state) -> dict:
  arrays = {'step': state.step, 'params': state.params, 'opt_state': state.opt_state,
            'batch_stats': state.batch_stats}
  if state.ema is not None:  # config.ema_decay > 0: the weight average
    arrays['ema'] = state.ema
  return arrays


def save(manager: ocp.CheckpointManager, step: int, state, mean_iou: float | None = None):
  """Saves asynchronously; a step already saved is left as it is."""
  if step in manager.all_steps():
    return
  metrics = None if mean_iou is None else {'mean_iou': float(mean_iou)}
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state_arrays(state))),
               metrics=metrics)


def restore_arrays(manager, step: int, template: dict) -> dict:
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  return manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))['state']


def _short(error: BaseException) -> str:
  """The first line of an error message, shortened: TensorStore's run to pages."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return text if len(text) <= 200 else text[:197] + '...'


def step_path(workdir: str, step: int) -> pathlib.Path:
  return pathlib.Path(workdir) / CHECKPOINT_DIR / str(step)


def unreadable(workdir: str, step: int, others, error: BaseException) -> WorkdirError:
  others = [s for s in others if s != step]
  return WorkdirError(
      f'checkpoint {step_path(workdir, step)} cannot be read ({_short(error)}); '
      f'other saved steps: {others or "none"} (pass --checkpoint=STEP)')


def _move_aside(workdir: str, step: int) -> pathlib.Path:
  """Moves an unreadable checkpoint out of the checkpoints folder, keeping it."""
  target = pathlib.Path(workdir) / UNREADABLE_DIR / str(step)
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
      shutil.rmtree(target)
    os.replace(step_path(workdir, step), target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'unet_jax.checkpointing: moved {step}')
  return target


def restore_or_keep(manager: ocp.CheckpointManager, state, config, workdir: str):
  """The newest readable checkpoint restored into `state`'s structure, or `state` itself.

  A checkpoint that cannot be read (damaged files) is moved to
  `<workdir>/unreadable_checkpoints/` with one warning, and the next newer
  one is tried; one that reads but does not fit the model is an error.
  """
  if manager.latest_step() is None:
    return state
  saved = load_config(workdir) if (pathlib.Path(workdir) / CONFIG_FILE).exists() else None
  if saved is not None:
    check_same_model(saved, config, workdir)
  template = state_arrays(state)
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      arrays = restore_arrays(manager, step, template)
    except (ValueError, KeyError, TypeError) as error:
      if _is_structure_mismatch(error):
        raise WorkdirError(f'checkpoint {step} in {workdir} does not match the model of this '
                           f'config: {_short(error)}') from error
      moved = _move_aside(workdir, step)
      logging.warning('checkpoint %d cannot be read (%s); moved it to %s and resuming from '
                      'the newest checkpoint that reads.', step, _short(error), moved)
      manager.reload()
      continue
    return state.replace(step=arrays['step'], params=arrays['params'],
                         opt_state=arrays['opt_state'], batch_stats=arrays['batch_stats'],
                         ema=arrays.get('ema'))
  logging.warning('no checkpoint in %s could be read; training starts from scratch.', workdir)
  return state


def _is_structure_mismatch(error: BaseException) -> bool:
  """True for a readable checkpoint of another tree or shape, not for damaged files."""
  text = str(error)
  return any(k in text for k in ('does not match', 'Dict key mismatch', 'tree structure',
                                 'Requested shape', 'incompatible with the stored shape'))


def model_template(config, sharding) -> dict:
  """The abstract model variables ('params', and 'batch_stats' with batch norm), placed."""
  model = models.unet_from_config(config.model)
  height, width = config.data.image_size
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, height, width, 3), jnp.float32),
                                             train=False))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      dict(shapes))


def restore_model(workdir: str, checkpoint: str = 'best', sharding=None,
                  weight_average: bool = True):
  """A workdir's model variables, for evaluation, prediction and export.

  Reads only the model's part of a training checkpoint (parameters and
  batch-norm statistics, not the optimizer state), against the shapes of
  `models.unet_from_config(config.model)`; no optimizer is built. A run
  trained with `ema_decay` > 0 gives its weight average, which it evaluated,
  or with weight_average=False the weights the optimizer reached at the same
  step (what the run would have been without the average: the average never
  feeds back into training).

  Args:
    workdir: a training workdir (config.json and checkpoints/).
    checkpoint: 'best' (highest validation mean IoU), 'latest' or a step.
    sharding: where the arrays go; by default replicated over every device
      here, whatever devices the checkpoint was written from.
    weight_average: for a run with `ema_decay` > 0, its average (True) or
      the optimizer's weights (False); a run without one has only the latter.

  Returns:
    (config, variables, step): the workdir's config, {'params': ...,
    ['batch_stats': ...]} and the step restored.

  Raises:
    WorkdirError: no workdir, no such checkpoint, or an unreadable one (named,
      with the other saved steps).
  """
  config = load_config(workdir)
  if not (pathlib.Path(workdir) / CHECKPOINT_DIR).is_dir():
    raise WorkdirError(f'{workdir} holds no checkpoint ({pathlib.Path(workdir) / CHECKPOINT_DIR} '
                       'does not exist)')
  manager = create_manager(workdir, config, read_only=True)
  try:
    step = select_step(manager, checkpoint, workdir)
    sharding = sharding or sharding_lib.replicated(sharding_lib.create_mesh())
    template = model_template(config, sharding)
    averaged = weight_average and config.get('ema_decay', 0.0) > 0
    if averaged:
      template = {'ema': template}
    restore_args = ocp.checkpoint_utils.construct_restore_args(template)
    try:
      variables = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=template, restore_args=restore_args, partial_restore=True)))['state']
      if averaged:
        variables = variables['ema']
    except Exception as error:  # pylint: disable=broad-except
      # TensorStore and Orbax raise many types for damaged files.
      raise unreadable(workdir, step, manager.all_steps(), error) from error
  finally:
    manager.close()
  return config, dict(variables), step


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` holds a completed checkpoint (Orbax's temporary
  folders of unfinished ones are not named by a bare step)."""
  folder = pathlib.Path(workdir) / CHECKPOINT_DIR
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def check_resumable(workdir: str, config) -> None:
  """Before any data work: a workdir with checkpoints has a readable config.json
  of the same model (see `check_same_model`)."""
  if (pathlib.Path(workdir) / CONFIG_FILE).exists() and has_checkpoints(workdir):
    check_same_model(load_config(workdir), config, workdir)


def model_differences(saved, config) -> list[str]:
  """The `model` fields in which `config` differs from a workdir's `saved` config."""
  differences = []
  for key, value in config.model.items():
    # Fields added since a workdir was written hold their defaults there.
    before = saved.model.get(key, ADDED_MODEL_FIELDS.get(key))
    if _plain(before) != _plain(value):
      differences.append(f'model.{key}: checkpoint {before!r}, config {value!r}')
  return differences


def check_init_from(config) -> None:
  """Before any data work: `config.init_from` is a workdir with checkpoints of
  the same model (image and crop sizes may differ: the network is fully
  convolutional)."""
  source = config.init_from
  try:
    saved = load_config(source)
  except WorkdirError as error:
    raise WorkdirError(f'config.init_from: {error}') from error
  if not has_checkpoints(source):
    raise WorkdirError(f'config.init_from: {source} holds no checkpoint')
  differences = model_differences(saved, config)
  if differences:
    raise WorkdirError(f'config.init_from: {source} holds a different model; the model '
                       f'settings must be the same. Differences: {"; ".join(differences)}')


def check_same_model(saved, config, workdir: str) -> None:
  differences = model_differences(saved, config)
  averaged = (saved.get('ema_decay', 0.0) > 0, config.get('ema_decay', 0.0) > 0)
  if averaged[0] != averaged[1]:
    differences.append(f'ema_decay: checkpoint {saved.get("ema_decay", 0.0)}, config '
                       f'{config.get("ema_decay", 0.0)} (a weight average is kept only with > 0)')
  if tuple(saved.data.image_size) != tuple(config.data.image_size):
    differences.append(f'data.image_size: checkpoint {tuple(saved.data.image_size)}, '
                       f'config {tuple(config.data.image_size)}')
  if differences:
    raise WorkdirError(f'{workdir} holds checkpoints of a different model; nothing was '
                       f'changed. Use a new workdir or the same model settings. '
                       f'Differences: {"; ".join(differences)}')


def _plain(value):
  return tuple(value) if isinstance(value, (list, tuple)) else value


def save_config(workdir: str, config) -> None:
  if jax.process_index() != 0:
    return
  path = pathlib.Path(workdir) / CONFIG_FILE
  temporary = path.with_suffix('.json.tmp')
  temporary.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(temporary, path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise WorkdirError(f'{path} does not exist: {workdir} is not a training workdir')
  try:
    values = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise WorkdirError(f'{path} is not valid JSON: {error}') from error
  except OSError as error:
    raise WorkdirError(f'{path} cannot be read: {error.strerror or error}') from error
  if not (isinstance(values, dict) and isinstance(values.get('model'), dict)
          and isinstance(values.get('data'), dict) and 'image_size' in values['data']):
    raise WorkdirError(f'{path} is not a training config (no model and data.image_size)')
  if 'decoder_filters' in values['model']:  # JSON lists back to the config's tuples
    values['model']['decoder_filters'] = tuple(values['model']['decoder_filters'])
  config = ml_collections.ConfigDict(values)
  config.data.image_size = tuple(config.data.image_size)
  return config


def select_step(manager: ocp.CheckpointManager, checkpoint: str, workdir: str) -> int:
  """'latest', 'best' or a step number -> a saved step."""
  steps = manager.all_steps()
  if not steps:
    raise WorkdirError(f'{workdir} holds no checkpoint')
  if checkpoint == 'latest':
    return manager.latest_step()
  if checkpoint == 'best':
    best = manager.best_step()
    return best if best is not None else manager.latest_step()
  try:
    step = int(checkpoint)
  except ValueError:
    raise WorkdirError(f"checkpoint must be 'best', 'latest' or a step, got {checkpoint!r}")
  if step not in steps:
    raise WorkdirError(f'{workdir} has no checkpoint at step {step}; saved steps: {list(steps)}')
  return step
