"""The synthetic scene generator: on-disk format, reproducibility, realism checks."""

import subprocess
import sys

import numpy as np
from PIL import Image

from unet_jax import carla_files
from unet_jax import synthetic
from unet_jax.classes import CLASS_NAMES

SKY, ROAD = CLASS_NAMES.index('Sky'), CLASS_NAMES.index('Road')


def test_files_are_in_carla_format(tmp_path):
  names = synthetic.write_scenes(tmp_path, 6, seed=1, size=(32, 48))
  assert names == ['000000', '000001', '000002', '000003', '001000', '001001']
  for name in names:
    image = Image.open(tmp_path / 'CameraRGB' / f'{name}.png')
    mask = np.asarray(Image.open(tmp_path / 'CameraMask' / f'{name}.png'))
    assert image.mode == 'RGBA' and image.size == (48, 32)
    assert (np.asarray(image)[..., 3] == 255).all()
    assert mask.shape == (32, 48, 4)
    assert mask[..., 0].max() <= 22
    assert not mask[..., 1:3].any() and (mask[..., 3] == 255).all()
  assert len(carla_files.validate_pairs(tmp_path)) == 6


def test_same_seed_same_files_other_seed_other_files(tmp_path):
  synthetic.write_scenes(tmp_path / 'a', 2, seed=3, size=(32, 48))
  synthetic.write_scenes(tmp_path / 'b', 2, seed=3, size=(32, 48))
  synthetic.write_scenes(tmp_path / 'c', 2, seed=4, size=(32, 48))
  for sub in ('CameraRGB', 'CameraMask'):
    a = (tmp_path / 'a' / sub / '000001.png').read_bytes()
    assert a == (tmp_path / 'b' / sub / '000001.png').read_bytes()
    assert a != (tmp_path / 'c' / sub / '000001.png').read_bytes()


def test_sky_above_road_below_and_shares_are_road_scene_like():
  counts = np.zeros(23, np.int64)
  for block in range(6):
    image, mask = synthetic.render_scene((0, block), 0, size=(120, 160))
    counts += np.bincount(mask.ravel(), minlength=23)
    assert (mask[0] == SKY).mean() > 0.3  # top row is mostly sky
    assert (mask[-1] == ROAD).mean() > 0.3  # bottom row is mostly road
  shares = counts / counts.sum()
  assert shares[0] == 0  # Unlabeled never occurs, as in CARLA
  assert 0.25 < shares[ROAD] < 0.6 and 0.15 < shares[SKY] < 0.5
  assert (shares > 0).sum() >= 8  # many classes, not a two-class toy


def test_frames_of_a_recording_are_near_duplicates_and_blocks_differ():
  frame0 = synthetic.render_scene((0, 5), 0, size=(60, 80))[1]
  frame1 = synthetic.render_scene((0, 5), 1, size=(60, 80))[1]
  other = synthetic.render_scene((0, 6), 0, size=(60, 80))[1]
  same_recording = (frame0 == frame1).mean()
  assert same_recording > 0.8
  assert (frame0 == other).mean() < same_recording


def test_colours_are_informative_but_varied():
  # Mean road colour differs between scenes (varied), yet road and sky differ within one.
  road_means, gaps = [], []
  for block in range(6):
    image, mask = synthetic.render_scene((2, block), 0, size=(120, 160))
    road = image[mask == ROAD].mean(0)
    road_means.append(road)
    gaps.append(np.abs(road - image[mask == SKY].mean(0)).max())
  assert np.ptp(np.array(road_means)[:, 0]) > 10
  assert min(gaps) > 20


def test_command_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'unet_jax.synthetic', f'--output={tmp_path}', '--num_scenes=2',
       '--seed=5', '--height=32', '--width=48'], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert sorted(p.name for p in (tmp_path / 'CameraMask').iterdir()) == ['000000.png', '000001.png']
