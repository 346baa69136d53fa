"""Reading, writing and validating the CARLA on-disk format."""

import pathlib
import struct
import zlib

import numpy as np
from PIL import Image
import pytest

from unet_jax import carla_files

RNG = np.random.default_rng(0)


def _write_pair(root: pathlib.Path, name: str, size=(8, 12), mode='RGBA', top_class=22):
  for sub in (carla_files.IMAGE_DIR, carla_files.MASK_DIR):
    (root / sub).mkdir(parents=True, exist_ok=True)
  image = RNG.integers(0, 256, size + (3,), dtype=np.uint8)
  Image.fromarray(image).convert(mode).save(root / carla_files.IMAGE_DIR / f'{name}.png')
  mask = RNG.integers(0, top_class + 1, size, dtype=np.uint8)
  carla_files.write_mask(root / carla_files.MASK_DIR / f'{name}.png', mask)
  return image, mask


def _png_header(width: int, height: int) -> bytes:
  """A valid PNG structure claiming the given size, with almost no pixel data."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
          + chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b''))


def test_mask_round_trip_is_carla_rgba(tmp_path):
  mask = RNG.integers(0, 23, (5, 7), dtype=np.uint8)
  path = tmp_path / 'm.png'
  carla_files.write_mask(path, mask)
  rgba = np.asarray(Image.open(path))
  assert rgba.shape == (5, 7, 4)
  np.testing.assert_array_equal(rgba[..., 0], mask)
  assert not rgba[..., 1:3].any()
  assert (rgba[..., 3] == 255).all()
  np.testing.assert_array_equal(carla_files.read_mask(path), mask)


def test_mask_class_comes_from_channel_0_only(tmp_path):
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., 0] = 7
  rgba[..., 1] = 200  # not a class: must be ignored
  rgba[..., 3] = 255
  Image.fromarray(rgba).save(tmp_path / 'm.png')
  assert (carla_files.read_mask(tmp_path / 'm.png') == 7).all()


@pytest.mark.parametrize('mode', ['L', 'RGB', 'RGBA'])
def test_images_of_any_common_mode_decode_to_rgb(tmp_path, mode):
  image = RNG.integers(0, 256, (6, 9, 3), dtype=np.uint8)
  Image.fromarray(image).convert(mode).save(tmp_path / 'i.png')
  decoded = carla_files.read_image(tmp_path / 'i.png')
  assert decoded.shape == (6, 9, 3) and decoded.dtype == np.uint8
  expected = np.asarray(Image.fromarray(image).convert(mode).convert('RGB'))
  np.testing.assert_array_equal(decoded, expected)


def test_validate_pairs_matches_by_name(tmp_path):
  for name in ('000001', '000002', '001000'):
    _write_pair(tmp_path, name, mode='RGB')
  pairs = carla_files.validate_pairs(tmp_path)
  assert [p.name for p in pairs] == ['000001', '000002', '001000']
  assert all(p.image_path.name == p.mask_path.name for p in pairs)


def _bad_message(tmp_path) -> str:
  with pytest.raises(carla_files.BadDataError) as info:
    carla_files.validate_pairs(tmp_path)
  assert isinstance(info.value, ValueError)
  return str(info.value)


def test_image_without_mask(tmp_path):
  _write_pair(tmp_path, '000001')
  _write_pair(tmp_path, '000002')
  (tmp_path / 'CameraMask' / '000002.png').unlink()
  message = _bad_message(tmp_path)
  assert 'CameraRGB/000002.png' in message and 'without a mask' in message


def test_mask_without_image(tmp_path):
  _write_pair(tmp_path, '000001')
  _write_pair(tmp_path, '000002')
  (tmp_path / 'CameraRGB' / '000002.png').unlink()
  message = _bad_message(tmp_path)
  assert 'CameraMask/000002.png' in message and 'without an image' in message


def test_truncated_png(tmp_path):
  _write_pair(tmp_path, '000001')
  _write_pair(tmp_path, '000002', size=(40, 40))
  path = tmp_path / 'CameraRGB' / '000002.png'
  path.write_bytes(path.read_bytes()[:200])
  message = _bad_message(tmp_path)
  assert 'CameraRGB/000002.png' in message and 'truncated' in message


def test_corrupt_png(tmp_path):
  _write_pair(tmp_path, '000001')
  path = tmp_path / 'CameraMask' / '000001.png'
  data = bytearray(path.read_bytes())
  data[60:80] = b'\x00' * 20  # inside the compressed pixel data
  path.write_bytes(bytes(data))
  message = _bad_message(tmp_path)
  assert 'CameraMask/000001.png' in message and 'corrupt' in message


def test_empty_file(tmp_path):
  _write_pair(tmp_path, '000001')
  (tmp_path / 'CameraRGB' / '000001.png').write_bytes(b'')
  message = _bad_message(tmp_path)
  assert 'CameraRGB/000001.png' in message and 'empty file' in message


def test_text_file_named_png(tmp_path):
  _write_pair(tmp_path, '000001')
  (tmp_path / 'CameraRGB' / '000001.png').write_text('not an image')
  message = _bad_message(tmp_path)
  assert 'CameraRGB/000001.png' in message and 'not an image' in message


def test_non_image_file_in_folder(tmp_path):
  _write_pair(tmp_path, '000001')
  (tmp_path / 'CameraRGB' / 'notes.txt').write_text('hello')
  message = _bad_message(tmp_path)
  assert 'CameraRGB/notes.txt' in message and 'not a .png' in message


def test_jpeg_renamed_png(tmp_path):
  _write_pair(tmp_path, '000001')
  Image.new('RGB', (8, 12)).save(tmp_path / 'CameraRGB' / '000001.png', format='JPEG')
  message = _bad_message(tmp_path)
  assert 'CameraRGB/000001.png' in message and 'not a PNG' in message


def test_photo_formats_take_jpeg_upright_and_the_dataset_does_not(tmp_path):
  image = np.random.default_rng(3).integers(0, 256, (3, 5, 3), np.uint8)
  image = np.repeat(np.repeat(image, 16, 0), 16, 1)  # flat 16x16 blocks survive JPEG closely
  photo = Image.fromarray(image)
  exif = photo.getexif()
  exif[0x0112] = 6  # shown turned 90 degrees clockwise
  photo.save(tmp_path / 'photo.jpg', exif=exif.tobytes(), quality=95)
  with pytest.raises(carla_files.BadDataError, match='photo.jpg: not a PNG file'):
    carla_files.read_image(tmp_path / 'photo.jpg')
  decoded = carla_files.read_image(tmp_path / 'photo.jpg', carla_files.PHOTO_FORMATS)
  upright, turned_the_other_way = np.rot90(image, k=-1), np.rot90(image, k=1)
  assert decoded.shape == upright.shape == (80, 48, 3)
  assert np.abs(decoded.astype(int) - upright).mean() < 4
  assert np.abs(decoded.astype(int) - turned_the_other_way).mean() > 30
  data = (tmp_path / 'photo.jpg').read_bytes()
  (tmp_path / 'cut.jpg').write_bytes(data[:len(data) // 2])
  with pytest.raises(carla_files.BadDataError, match='cut.jpg: corrupt or truncated JPEG'):
    carla_files.read_image(tmp_path / 'cut.jpg', carla_files.PHOTO_FORMATS)


def test_image_and_mask_sizes_differ(tmp_path):
  _write_pair(tmp_path, '000001', size=(8, 12))
  carla_files.write_mask(tmp_path / 'CameraMask' / '000001.png', np.ones((8, 10), np.uint8))
  message = _bad_message(tmp_path)
  assert 'CameraRGB/000001.png' in message and 'CameraMask/000001.png' in message
  assert '12x8' in message and '10x8' in message


def test_mask_value_above_last_class(tmp_path):
  _write_pair(tmp_path, '000001')
  mask = np.full((8, 12), 5, np.uint8)
  mask[3, 4] = 23
  carla_files.write_mask(tmp_path / 'CameraMask' / '000001.png', mask)
  message = _bad_message(tmp_path)
  assert 'CameraMask/000001.png' in message and 'mask value 23' in message


def test_missing_folder(tmp_path):
  with pytest.raises(carla_files.BadDataError, match='CameraRGB: missing folder'):
    carla_files.validate_pairs(tmp_path / 'nowhere')


def test_empty_folder(tmp_path):
  (tmp_path / 'CameraRGB').mkdir()
  (tmp_path / 'CameraMask').mkdir()
  with pytest.raises(carla_files.BadDataError, match='empty dataset folder') as info:
    carla_files.validate_pairs(tmp_path)
  assert str(tmp_path) in str(info.value)


def test_decompression_bomb_is_our_error(tmp_path):
  _write_pair(tmp_path, '000001')
  # 100000 x 100000 pixels: PIL itself refuses this at open time.
  (tmp_path / 'CameraRGB' / '000001.png').write_bytes(_png_header(100_000, 100_000))
  message = _bad_message(tmp_path)
  assert 'CameraRGB/000001.png' in message and 'decompression bomb' in message


@pytest.mark.parametrize('width,height', [(8000, 7000), (10_000, 10_000)])
def test_image_above_our_pixel_limit(tmp_path, width, height):
  _write_pair(tmp_path, '000001')
  # Below PIL's error threshold (10000 x 10000 only warns there) but above ours.
  (tmp_path / 'CameraRGB' / '000001.png').write_bytes(_png_header(width, height))
  message = _bad_message(tmp_path)
  assert 'CameraRGB/000001.png' in message and 'decompression bomb' in message


def test_skip_bad_pairs_warns_once_listing_all(tmp_path):
  for name in ('000001', '000002', '000003', '000004'):
    _write_pair(tmp_path, name)
  (tmp_path / 'CameraMask' / '000002.png').unlink()
  (tmp_path / 'CameraRGB' / '000003.png').write_bytes(b'')
  with pytest.warns(UserWarning) as record:
    pairs = carla_files.validate_pairs(tmp_path, skip_bad_pairs=True)
  assert [p.name for p in pairs] == ['000001', '000004']
  assert len(record) == 1
  message = str(record[0].message)
  assert 'CameraRGB/000002.png' in message and 'CameraRGB/000003.png' in message


def test_without_skip_all_problems_are_listed_in_one_error(tmp_path):
  for name in ('000001', '000002', '000003'):
    _write_pair(tmp_path, name)
  (tmp_path / 'CameraMask' / '000002.png').unlink()
  (tmp_path / 'CameraRGB' / '000003.png').write_bytes(b'')
  message = _bad_message(tmp_path)
  assert '2 bad file(s)' in message and 'skip_bad_pairs' in message
  assert 'CameraRGB/000002.png' in message and 'CameraRGB/000003.png' in message


def test_fingerprint_changes_with_content(tmp_path):
  _write_pair(tmp_path, '000001')
  before = carla_files.fingerprint(tmp_path)
  assert carla_files.fingerprint(tmp_path) == before
  _write_pair(tmp_path, '000002')
  assert carla_files.fingerprint(tmp_path) != before


def test_real_pairs_decode(shared_carla_dir):
  pairs, problems = carla_files.list_pairs(shared_carla_dir)
  assert len(pairs) == 490 and not problems
  by_name = {p.name: p for p in pairs}
  # 002128 is stored RGBA, 000026 re-encoded as RGB: both must give 3 channels.
  for name in ('002128', '000026'):
    image, mask = carla_files.read_pair(by_name[name])
    assert image.shape == (480, 640, 3) and mask.shape == (480, 640)
    assert 1 <= mask.min() and mask.max() <= 22
