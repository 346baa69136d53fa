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
  for key, value in overrides.items():
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
