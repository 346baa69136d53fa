"""Shared test set-up: tests run on CPU; multi-device tests spawn their own
processes with XLA_FLAGS set, since the flag must be set before JAX starts."""

import os
import pathlib
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests compile the same tiny programs; a persistent cache shared by the
# test processes (and the subprocesses they start) compiles each only once.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    tempfile.gettempdir(), f'unet_jax_test_xla_cache_{os.getuid()}'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
# Prepared copies of test data go to one temporary cache per run, not ~/.cache.
os.environ.setdefault('UNET_JAX_CACHE', tempfile.mkdtemp(prefix='unet_jax_test_cache_'))

import pytest  # noqa: E402

from unet_jax import xla_flags  # noqa: E402

# The flags the entry points run with, for every test (before JAX starts).
xla_flags.set_default_flags()

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_CARLA = REPO.parent / 'shared' / 'carla'


@pytest.fixture
def shared_carla_dir():
  """The real CARLA pairs beside the checkout; skips where they are absent."""
  if not (SHARED_CARLA / 'CameraRGB').is_dir():
    pytest.skip('real CARLA pairs (../shared/carla) are not present')
  return SHARED_CARLA


def tiny_config(data_dir, **overrides):
  """The tiny test config: depth-2 U-Net with 4 base filters on 32x32 scenes."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  config = synthetic.get_config('smoke')
  config.data.data_dir = str(data_dir)
  config.data.synthetic_scenes = 0
  config.data.split_key = 'name'  # few frames: split frame by frame
  config.data.validation_fraction = 0.25
  config.data.test_fraction = 0.0
  config.batch_size = 4
  config.num_epochs = 2
  config.log_every_steps = 2
  config.checkpoint_every_steps = 3
  config.model.dropout_rate = 0.3
  return override(config, overrides)


def override(config, values: dict):
  """`config` with each dotted field of `values` ('data.image_size': ...) set."""
  for key, value in values.items():
    target = config
    *parents, leaf = key.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


@pytest.fixture(scope='session')
def synthetic_dir(tmp_path_factory):
  """24 small synthetic scenes in the CARLA on-disk format, shared by the session."""
  from unet_jax import synthetic  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp('synthetic')
  synthetic.write_scenes(path, 24, seed=0, size=(48, 64))
  return path


def saved_params(workdir, checkpoint: str = 'latest'):
  """(step, every parameter of a workdir's checkpoint as one flat float array)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from unet_jax import checkpointing  # pylint: disable=g-import-not-at-top
  _, variables, step = checkpointing.restore_model(str(workdir), checkpoint)
  return step, np.concatenate([np.ravel(x) for x in jax.tree.leaves(variables['params'])])


# --------------------------------------------------------------------------
# A tiny workdir trained once per test run, shared by the evaluate, predict,
# test-time augmentation and command-line tests. With pytest-xdist every
# worker is its own process: the first to arrive trains under a file lock in
# the run's shared temporary folder and the others reuse its workdir and its
# final evaluation (saved beside it as JSON).

TRAINED_SCENES = 16
TRAINED_SCENE_SIZE = (40, 56)  # not the model's 32x32: evaluation resizes as in training
_SUMMARY_FILE = 'final_evaluation.json'


def trained_config(data_dir):
  """carla.py's smoke model (32x32, base 4, depth 2, batch 4), 16 frames split frame by frame."""
  return tiny_config(data_dir, **{'data.test_fraction': 0.25, 'log_every_steps': 1})


def _shared_root(tmp_path_factory) -> pathlib.Path:
  base = tmp_path_factory.getbasetemp()
  # Under xdist each worker's base folder sits in one folder of the run.
  return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


def _summary_to_json(summary: dict) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  return {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v)
          for k, v in summary.items()}


def _summary_from_json(values: dict) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  arrays = ('per_class_iou', 'per_class_accuracy', 'pixel_count', 'confusion_matrix')
  return {k: (np.asarray(v) if k in arrays else v) for k, v in values.items()}


@pytest.fixture(scope='session')
def trained(tmp_path_factory):
  """{'workdir', 'data_dir', 'config', 'final'}; 'final' is training's last evaluation."""
  import fcntl  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from unet_jax import synthetic  # pylint: disable=g-import-not-at-top
  from unet_jax import train  # pylint: disable=g-import-not-at-top
  root = _shared_root(tmp_path_factory) / 'tiny_trained_unet'
  root.mkdir(exist_ok=True)
  data_dir, workdir = root / 'frames', root / 'workdir'
  config = trained_config(data_dir)
  with open(root / '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / _SUMMARY_FILE).exists():
      synthetic.write_scenes(data_dir, TRAINED_SCENES, seed=3, size=TRAINED_SCENE_SIZE)
      final = train.train_and_evaluate(config, str(workdir))
      (root / _SUMMARY_FILE).write_text(json.dumps(_summary_to_json(final)))
    final = _summary_from_json(json.loads((root / _SUMMARY_FILE).read_text()))
  return {'workdir': workdir, 'data_dir': data_dir, 'config': config, 'final': final}

