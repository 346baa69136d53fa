"""Prediction: tiling geometry, output sizes and format, bad inputs, and where it writes."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from unet_jax import carla_files
from unet_jax import checkpointing
from unet_jax import models
from unet_jax import predict
from unet_jax import preprocessing
from unet_jax import synthetic
from unet_jax import visualize


REPO = pathlib.Path(__file__).resolve().parents[1]



def _write_frame(path, size, seed=0):
  image, _ = synthetic.render_scene((seed, 0), 0, size)
  carla_files.write_image(path, image)
  return image


def _tree(root: pathlib.Path) -> dict:
  """Every file under root with its bytes (links by their target)."""
  return {p.relative_to(root): (os.readlink(p) if p.is_symlink() else p.read_bytes())
          for p in sorted(root.rglob('*')) if p.is_file() or p.is_symlink()}


# ---- tiling geometry, with stand-in models whose output is known ----


@pytest.mark.parametrize('padding', ['VALID', 'SAME'])
@pytest.mark.parametrize('size', [(481, 643), (37, 29), (5, 3), (44, 44)])
def test_tiles_put_back_together_give_the_image(padding, size):
  """A stand-in model that returns the centre of its input channel 0 (what the U-Net
  predicts a pixel from): assembled tiles must give back the image exactly."""
  in_size = (44, 44) if padding == 'VALID' else (32, 48)
  plan = predict.plan_tiles(size, in_size, models.output_size(in_size, 2, padding))
  image = np.random.default_rng(0).random((*size, 3)).astype(np.float32)
  tiles = predict.cut_tiles(image, plan)
  assert tiles.shape == (plan.num_tiles, *in_size, 3)
  outputs = models.center_crop(tiles, *plan.out_size)[..., 0]
  np.testing.assert_array_equal(predict.assemble(outputs, plan), image[..., 0])


def test_valid_tiles_abut_and_same_tiles_overlap_by_half():
  valid = predict.plan_tiles((100, 100), (44, 44), models.output_size((44, 44), 2, 'VALID'))
  assert valid.out_size == (4, 4) and valid.border == (20, 20)
  np.testing.assert_array_equal(np.diff(valid.starts_y), 4)
  same = predict.plan_tiles((100, 100), (32, 32), (32, 32))
  assert same.border == (0, 0)
  assert np.all(np.diff(same.starts_y) <= 16) and same.starts_y[-1] == 100 - 32


def test_each_pixel_comes_from_the_tile_whose_centre_is_nearest():
  starts = predict.tile_starts(100, 32, 16)
  tile, offset = predict.nearest_tile(100, starts, 32)
  assert np.all((offset >= 0) & (offset < 32))
  # Away from the image border no pixel is taken within a quarter tile of a tile edge.
  inner = (np.arange(100) >= 8) & (np.arange(100) < 92)
  assert np.all((offset[inner] >= 8) & (offset[inner] < 24))


# ---- the trained model ----


def test_raw_masks_read_back_as_exactly_the_predicted_indices(trained, tmp_path):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  image = _write_frame(inputs / 'frame.png', (45, 61), seed=4)
  run = predict.predict_files(str(trained['workdir']), str(inputs), str(tmp_path / 'out'),
                              checkpoint='latest')
  assert run.written == [inputs / 'frame.png'] and not run.failed

  # The same prediction computed directly: training's resize, the model, nearest back.
  config, variables, _ = checkpointing.restore_model(str(trained['workdir']), 'latest')
  resized, _ = preprocessing.resize_pair(image, np.zeros((45, 61), np.uint8),
                                          config.data.image_size)
  logits = models.unet_from_config(config.model).apply(
      variables, resized[None].astype(np.float32) / 255.0, train=False)
  expected = predict.restore_size(np.asarray(np.argmax(logits[0], -1), np.uint8), (45, 61))
  assert len(np.unique(expected)) > 1  # a mask of one class would prove little

  # Read back as the CARLA data loader reads a pair.
  _, mask = carla_files.read_pair(carla_files.Pair('frame', inputs / 'frame.png',
                                                   tmp_path / 'out' / 'frame_mask.png'))
  np.testing.assert_array_equal(mask, expected)
  colours = np.asarray(carla_files.read_image(tmp_path / 'out' / 'frame_color.png'))
  np.testing.assert_array_equal(colours, visualize.colorize(expected))
  overlay = carla_files.read_image(tmp_path / 'out' / 'frame_overlay.png')
  np.testing.assert_array_equal(overlay, visualize.overlay(image, expected))


@pytest.mark.parametrize('mode', ['resize', 'tile'])
def test_outputs_have_the_size_of_odd_sized_inputs(trained, tmp_path, mode):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  sizes = {'large': (481, 643), 'tiny': (7, 5), 'tall': (97, 33)}
  for seed, (name, size) in enumerate(sizes.items()):
    _write_frame(inputs / f'{name}.png', size, seed)
  run = predict.predict_files(str(trained['workdir']), str(inputs), str(tmp_path / 'out'),
                              mode=mode, batch_size=3)
  assert not run.failed and len(run.written) == 3
  for name, size in sizes.items():
    assert carla_files.read_mask(tmp_path / 'out' / f'{name}_mask.png').shape == size
    for suffix in ('_color.png', '_overlay.png'):
      assert carla_files.read_image(tmp_path / 'out' / f'{name}{suffix}').shape == (*size, 3)


def test_jpeg_photos_are_predicted_upright_and_other_formats_refused(trained, tmp_path):
  """A camera's JPEG (stored sideways, with an EXIF rotation) gets masks at the size a
  viewer shows; a GIF, and a PNG whose outputs would overwrite the JPEG's, are refused
  by name."""
  inputs = tmp_path / 'in'
  inputs.mkdir()
  image, _ = synthetic.render_scene((5, 0), 0, (40, 64))
  photo = Image.fromarray(image)
  exif = photo.getexif()
  exif[0x0112] = 6  # EXIF orientation: shown turned 90 degrees clockwise
  photo.save(inputs / 'dash.jpg', exif=exif.tobytes(), quality=95)
  photo.save(inputs / 'still.gif')
  _write_frame(inputs / 'dash.png', (30, 30))
  run = predict.predict_files(str(trained['workdir']), str(inputs), str(tmp_path / 'out'))
  assert run.written == [inputs / 'dash.jpg']
  assert [(path.name, why) for path, why in run.failed] == [
      ('dash.png', f'{inputs / "dash.png"}: same name stem as {inputs / "dash.jpg"}, whose '
                   'outputs it would overwrite'),
      ('still.gif', f'{inputs / "still.gif"}: not a PNG or JPEG file (found GIF)')]
  assert carla_files.read_mask(tmp_path / 'out' / 'dash_mask.png').shape == (64, 40)
  overlay = carla_files.read_image(tmp_path / 'out' / 'dash_overlay.png')
  assert overlay.shape == (64, 40, 3)


def test_bad_files_are_reported_by_name_and_the_others_written(trained, tmp_path):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  _write_frame(inputs / 'a.png', (40, 50), 1)
  _write_frame(inputs / 'c.png', (30, 30), 2)
  (inputs / 'b.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
  (inputs / 'empty.png').write_bytes(b'')
  (inputs / 'notes.txt').write_text('not an image')
  run = predict.predict_files(str(trained['workdir']), str(inputs), str(tmp_path / 'out'))
  assert run.written == [inputs / 'a.png', inputs / 'c.png']
  failed = {path.name: why for path, why in run.failed}
  assert sorted(failed) == ['b.png', 'empty.png', 'notes.txt']
  assert all(str(inputs / name) in why for name, why in failed.items())
  assert 'empty file' in failed['empty.png']
  assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == [
      'a_color.png', 'a_mask.png', 'a_overlay.png', 'c_color.png', 'c_mask.png',
      'c_overlay.png']


def test_never_writes_outside_the_output_folder(trained, tmp_path):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  _write_frame(inputs / 'x.png', (20, 24))
  output = tmp_path / 'out'
  output.mkdir()
  outside = tmp_path / 'precious.png'
  outside.write_bytes(b'keep me')
  # A planted link where an output will go must be replaced, not written through.
  (output / 'x_mask.png').symlink_to(outside)
  before = _tree(tmp_path)
  predict.predict_files(str(trained['workdir']), str(inputs), str(output))
  after = _tree(tmp_path)
  assert outside.read_bytes() == b'keep me'
  assert not (output / 'x_mask.png').is_symlink()
  changed = {path for path in after if before.get(path) != after[path]}
  assert changed == {pathlib.Path('out') / f'x{s}' for s in predict.OUTPUT_SUFFIXES}
  assert not list(output.glob('.*.tmp'))


@pytest.mark.parametrize('where', ['the input folder', 'its parent', 'a link to it'])
def test_an_output_folder_holding_an_input_is_refused(trained, tmp_path, where):
  """Outputs could overwrite inputs there: refused before anything is written."""
  inputs = tmp_path / 'work' / 'in'
  inputs.mkdir(parents=True)
  _write_frame(inputs / 'x.png', (20, 24))
  (inputs / 'x_mask.png').write_bytes(b'an input that happens to look like an output')
  (tmp_path / 'link').symlink_to(inputs)
  output = {'the input folder': inputs, 'its parent': inputs / '..',
            'a link to it': tmp_path / 'link'}[where]
  before = _tree(tmp_path)
  with pytest.raises(ValueError, match='contains the input'):
    predict.predict_files(str(trained['workdir']), str(inputs), str(output))
  with pytest.raises(ValueError, match='contains the input'):  # a single file as input
    predict.predict_files(str(trained['workdir']), str(inputs / 'x.png'), str(output))
  assert _tree(tmp_path) == before


def test_the_command_on_two_devices_matches_one_and_exits_non_zero_on_a_bad_file(trained,
                                                                                 tmp_path):
  inputs = tmp_path / 'in'
  inputs.mkdir()
  for seed in range(3):  # 3 images, batches of 2 tiles: the last batch is padded
    _write_frame(inputs / f'f{seed}.png', (33, 47), seed)
  (inputs / 'broken.png').write_bytes(b'nope')
  run = predict.predict_files(str(trained['workdir']), str(inputs), str(tmp_path / 'one'),
                              batch_size=2)
  assert len(run.written) == 3 and jax.local_device_count() == 1
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  result = subprocess.run(
      [sys.executable, '-m', 'unet_jax.predict', f'--workdir={trained["workdir"]}',
       f'--input={inputs}', f'--output={tmp_path / "two"}', '--batch_size=2'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  assert str(inputs / 'broken.png') in result.stdout
  assert 'Wrote predictions for 3 of 4 file(s)' in result.stdout + result.stderr
  for seed in range(3):
    np.testing.assert_array_equal(carla_files.read_mask(tmp_path / 'two' / f'f{seed}_mask.png'),
                                  carla_files.read_mask(tmp_path / 'one' / f'f{seed}_mask.png'))
