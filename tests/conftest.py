"""Shared test set-up: tests run on CPU; multi-device tests spawn their own
processes with XLA_FLAGS set, since the flag must be set before JAX starts."""

import os
import pathlib

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_CARLA = REPO.parent / 'shared' / 'carla'


@pytest.fixture
def shared_carla_dir():
  """The real CARLA pairs beside the checkout; skips where they are absent."""
  if not (SHARED_CARLA / 'CameraRGB').is_dir():
    pytest.skip('real CARLA pairs (../shared/carla) are not present')
  return SHARED_CARLA
