"""Orbax checkpoints and the workdir's saved config.

A workdir holds `config.json` (the resolved config of the run) and
`checkpoints/<step>/`. Checkpoints are written asynchronously and atomically
(Orbax writes to a temporary folder and renames it when complete, so a
process killed mid-write leaves nothing that `latest_step` would pick), with
the `max_to_keep` latest and the best by validation mean IoU preserved. They
hold arrays only (no pickle).
"""

import json
import os
import pathlib
import shutil
import tempfile

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
# Below this much free space a run would fail at its first checkpoint, not now.
MIN_FREE_BYTES = 256 * 2**20
# Model fields that configs written before them lack, with the value they meant.
ADDED_MODEL_FIELDS = {'encoder': 'unet', 'pretrained': False, 'frozen_encoder_batch_norm': False,
                      'decoder_filters': (256, 128, 64, 32, 16)}


class WorkdirError(ValueError):
  pass


def check_workdir(workdir: str) -> None:
  """Fails now, not after an hour, if the workdir cannot take checkpoints."""
  path = pathlib.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix='.write_test_'):
      pass
  except OSError as error:
    raise WorkdirError(f'workdir {workdir} is not writable: {error}') from error
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
  return {'step': state.step, 'params': state.params, 'opt_state': state.opt_state,
          'batch_stats': state.batch_stats}


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


def restore_or_keep(manager: ocp.CheckpointManager, state, config, workdir: str):
  """The latest checkpoint restored into `state`'s structure, or `state` itself."""
  step = manager.latest_step()
  if step is None:
    return state
  saved = load_config(workdir) if (pathlib.Path(workdir) / CONFIG_FILE).exists() else None
  if saved is not None:
    check_same_model(saved, config, workdir)
  try:
    arrays = restore_arrays(manager, step, state_arrays(state))
  except (ValueError, KeyError, TypeError) as error:
    raise WorkdirError(f'checkpoint {step} in {workdir} does not match the model of this '
                       f'config: {error}') from error
  return state.replace(step=arrays['step'], params=arrays['params'],
                       opt_state=arrays['opt_state'], batch_stats=arrays['batch_stats'])


def check_same_model(saved, config, workdir: str) -> None:
  differences = []
  for key, value in config.model.items():
    # Fields added since a workdir was written hold their defaults there.
    before = saved.model.get(key, ADDED_MODEL_FIELDS.get(key))
    if _plain(before) != _plain(value):
      differences.append(f'model.{key}: checkpoint {before!r}, config {value!r}')
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
  except json.JSONDecodeError as error:
    raise WorkdirError(f'{path} is not valid JSON: {error}') from error
  if 'decoder_filters' in values.get('model', {}):  # JSON lists back to the config's tuples
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
