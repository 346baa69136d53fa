"""The on-disk CARLA format: listing, decoding, validating and writing pairs.

A dataset folder holds `CameraRGB/<name>.png` and `CameraMask/<name>.png`,
matched by file name. The mask is not a picture: channel 0 holds the class
index and channels 1 and 2 are zero (RGBA, alpha 255, as CARLA writes it).
Whatever the PNG's storage (RGB, RGBA, palette, grayscale with or without
alpha, 16-bit), a pixel's class is the red value of the colour a viewer
shows. Every problem is a `BadDataError` (a `ValueError`) whose message
names the file and what is wrong with it. Prediction also reads JPEG
photos (`PHOTO_FORMATS`); training data stays PNG.
"""

from collections.abc import Sequence
import concurrent.futures
import dataclasses
import errno
import hashlib
import io
import os
import pathlib
import warnings

import numpy as np
from PIL import Image
from PIL import ImageOps

from unet_jax import classes
from unet_jax import errors

IMAGE_DIR = 'CameraRGB'
MASK_DIR = 'CameraMask'
# CARLA frames are 0.3 megapixels; anything beyond this is almost certainly a
# decompression bomb (a tiny file that would expand to gigabytes).
MAX_PIXELS = 50_000_000
# A frame smaller than this on a side holds no scene worth learning from
# (resized to the model's input it would be a few blown-up pixels).
MIN_SIDE = 8
# What predict reads: CARLA's PNG frames and other cameras' JPEG photos.
PHOTO_FORMATS = ('PNG', 'JPEG')
SIGNATURES = {'PNG': b'\x89PNG\r\n\x1a\n', 'JPEG': b'\xff\xd8\xff'}
# Where the hint for skipping bad pairs points, per program.
SKIP_HINT = ('set config.data.skip_bad_pairs=True (training) or pass --skip_bad_pairs '
             '(evaluate) to skip them')

PathLike = str | os.PathLike


class BadDataError(errors.UserError, ValueError):
  """A dataset file is missing, unreadable or inconsistent with its partner."""


@dataclasses.dataclass(frozen=True)
class Pair:
  name: str  # file stem, e.g. '002128'
  image_path: pathlib.Path
  mask_path: pathlib.Path


def _broken_link(path: pathlib.Path) -> str | None:
  """Why a link cannot be followed ('dangling link', 'symbolic link loop'), or None."""
  if not path.is_symlink():
    return None
  try:
    path.stat()
  except OSError as error:
    if error.errno == errno.ELOOP:
      return 'symbolic link loop'
    return f'dangling link to {os.readlink(path)}'
  return None


def _files(folder: pathlib.Path) -> tuple[dict[str, pathlib.Path], list[str]]:
  """The visible .png files of `folder` as {stem: path}, and one problem per other entry.

  Folders are left alone; links that lead nowhere and files that are not
  .png are problems.
  """
  pngs, problems = {}, []
  for path in sorted(folder.iterdir()):
    if path.name.startswith('.'):
      continue
    broken = _broken_link(path)
    if broken:
      problems.append(f'{path}: {broken}')
    elif path.is_file():
      if path.suffix.lower() == '.png':
        pngs[path.stem] = path
      else:
        problems.append(f'{path}: not a .png image file')
  return pngs, problems


def list_pairs(data_dir: PathLike) -> tuple[list[Pair], list[str]]:
  """Lists matched pairs by name, and one problem line per file without a partner.

  Raises BadDataError when the folder or one of its two subfolders is missing
  or holds no files at all: there is nothing to skip to in that case.
  """
  data_dir = pathlib.Path(data_dir)
  for sub in (IMAGE_DIR, MASK_DIR):
    if not (data_dir / sub).is_dir():
      raise BadDataError(
          f'{data_dir / sub}: missing folder; a CARLA dataset folder holds '
          f'{IMAGE_DIR}/<name>.png and {MASK_DIR}/<name>.png')
  images, image_problems = _files(data_dir / IMAGE_DIR)
  masks, mask_problems = _files(data_dir / MASK_DIR)
  if not images and not masks:
    raise BadDataError(f'{data_dir}: empty dataset folder, no .png files in {IMAGE_DIR}/ or {MASK_DIR}/')
  problems = image_problems + mask_problems
  for stem in sorted(images.keys() - masks.keys()):
    problems.append(f'{images[stem]}: image without a mask ({MASK_DIR}/{images[stem].name} is missing)')
  for stem in sorted(masks.keys() - images.keys()):
    problems.append(f'{masks[stem]}: mask without an image ({IMAGE_DIR}/{masks[stem].name} is missing)')
  pairs = [Pair(stem, images[stem], masks[stem]) for stem in sorted(images.keys() & masks.keys())]
  return pairs, problems


def _open(data: bytes, path: PathLike, formats: Sequence[str] = ('PNG',)) -> Image.Image:
  """Opens and fully decodes image bytes of one of `formats`; every failure is a BadDataError."""
  kinds = ' or '.join(formats)
  # The format's name, from the file's first bytes (its header may be cut short).
  found = next((name for name, start in SIGNATURES.items() if data.startswith(start)), kinds)
  if not data:
    raise BadDataError(f'{path}: empty file')
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))
      if image.format not in formats:
        raise BadDataError(f'{path}: not a {kinds} file (found {image.format})')
      width, height = image.size
      if width * height > MAX_PIXELS:
        raise BadDataError(
            f'{path}: image of {width}x{height} pixels exceeds the limit of {MAX_PIXELS} '
            '(possible decompression bomb)')
      image.load()
      if image.format == 'JPEG':
        # Upright as a viewer shows it (phone and dash cameras store a rotation).
        image = ImageOps.exif_transpose(image)
  except BadDataError:
    raise
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise BadDataError(f'{path}: image too large, possible decompression bomb ({e})') from e
  except Image.UnidentifiedImageError as e:
    raise BadDataError(f'{path}: not an image file (unreadable as {kinds})') from e
  except (OSError, SyntaxError, ValueError) as e:
    # PIL reports truncated or corrupt streams as OSError/SyntaxError.
    raise BadDataError(f'{path}: corrupt or truncated {found} ({e})') from e
  return image


def _read_bytes(path: PathLike) -> bytes:
  try:
    return pathlib.Path(path).read_bytes()
  except OSError as e:
    raise BadDataError(f'{path}: cannot read file ({e.strerror})') from e


def decode_image(data: bytes, path: PathLike = '<bytes>',
                 formats: Sequence[str] = ('PNG',)) -> np.ndarray:
  """Image bytes -> uint8 [H, W, 3]; grayscale, palette, RGB and RGBA are accepted.

  CARLA frames are PNG; `formats=PHOTO_FORMATS` also takes JPEG, turned
  upright by its EXIF orientation.
  """
  image = _open(data, path, formats)
  return np.asarray(image.convert('RGB'), dtype=np.uint8)


def _mask_indices(image: Image.Image, path: PathLike) -> np.ndarray:
  """The red value of the colour each pixel shows: the class index."""
  if image.mode in ('RGB', 'RGBA'):
    return np.asarray(image)[..., 0]
  if image.mode.startswith('I'):
    # 16-bit grey: a viewer shows value / 257. Only 8-bit values stored as
    # 16-bit (multiples of 257) have a class index by that rule.
    values = np.asarray(image).astype(np.int64)
    odd = values[(values % 257 != 0) | (values < 0)]
    if odd.size:
      raise BadDataError(
          f'{path}: 16-bit grayscale mask holds {int(odd[0])}, not an 8-bit value scaled by '
          '257; save masks as 8-bit with the class index in the red channel')
    return (values // 257).astype(np.uint8)
  # Palette, grayscale (with or without alpha), bilevel: the shown colour's red.
  return np.asarray(image.convert('RGBA'))[..., 0]


def decode_mask(data: bytes, path: PathLike = '<bytes>',
                num_classes: int = classes.NUM_CLASSES) -> np.ndarray:
  """PNG bytes -> uint8 [H, W] class indices (the shown red), checked < num_classes."""
  image = _open(data, path)
  array = _mask_indices(image, path)
  top = int(array.max()) if array.size else 0
  if top >= num_classes:
    raise BadDataError(
        f'{path}: mask value {top} is not a class index (classes are 0..{num_classes - 1})')
  return array.astype(np.uint8)


def png_mode(data: bytes) -> str:
  """The PIL mode ('RGB', 'RGBA', 'L', ...) of PNG bytes, from the header alone."""
  with Image.open(io.BytesIO(data)) as image:
    return image.mode


def read_image(path: PathLike, formats: Sequence[str] = ('PNG',)) -> np.ndarray:
  return decode_image(_read_bytes(path), path, formats)


def read_mask(path: PathLike, num_classes: int = classes.NUM_CLASSES) -> np.ndarray:
  return decode_mask(_read_bytes(path), path, num_classes)


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
  """uint8 [H, W] or [H, W, C] -> PNG bytes (fast compression: files are rewritten often)."""
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(
      buffer, format='PNG', compress_level=compress_level)
  return buffer.getvalue()


def mask_to_carla_rgba(mask: np.ndarray) -> np.ndarray:
  """uint8 [H, W] indices -> uint8 [H, W, 4]: index in channel 0, alpha 255."""
  rgba = np.zeros(mask.shape + (4,), np.uint8)
  rgba[..., 0] = mask
  rgba[..., 3] = 255
  return rgba


def write_mask(path: PathLike, mask: np.ndarray) -> None:
  """Writes class indices [H, W] as a CARLA mask PNG; `read_mask` reads it back."""
  mask = np.asarray(mask)
  if mask.ndim != 2 or mask.size and (mask.min() < 0 or mask.max() > 255):
    raise ValueError(f'{path}: a mask must be [H, W] indices in 0..255, got shape {mask.shape}')
  pathlib.Path(path).write_bytes(encode_png(mask_to_carla_rgba(mask.astype(np.uint8))))


def write_image(path: PathLike, image: np.ndarray) -> None:
  """Writes uint8 [H, W, 3] as an RGBA PNG with opaque alpha, like CARLA's camera."""
  alpha = np.full(image.shape[:2] + (1,), 255, np.uint8)
  pathlib.Path(path).write_bytes(encode_png(np.concatenate([image, alpha], axis=-1)))


def read_pair(pair: Pair, num_classes: int = classes.NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
  """Decodes a pair and checks that image and mask have the same size."""
  image = read_image(pair.image_path)
  if min(image.shape[:2]) < MIN_SIDE:
    raise BadDataError(f'{pair.image_path}: image of {image.shape[1]}x{image.shape[0]} pixels is '
                       f'too small (frames need at least {MIN_SIDE} pixels on a side)')
  mask = read_mask(pair.mask_path, num_classes)
  if image.shape[:2] != mask.shape:
    raise BadDataError(
        f'{pair.image_path}: image is {image.shape[1]}x{image.shape[0]} but its mask '
        f'{pair.mask_path} is {mask.shape[1]}x{mask.shape[0]} (width x height)')
  return image, mask


def _check_pair(pair: Pair, num_classes: int) -> str | None:
  try:
    read_pair(pair, num_classes)
  except BadDataError as e:
    return str(e)
  return None


def validate_pairs(data_dir: PathLike, num_classes: int = classes.NUM_CLASSES,
                   skip_bad_pairs: bool = False) -> list[Pair]:
  """Lists and fully decodes every pair; returns the good ones.

  With skip_bad_pairs=False any problem raises one BadDataError listing every
  bad file; with True the bad pairs are dropped with one warning listing them.
  Either way an empty result is an error.
  """
  pairs, problems = list_pairs(data_dir)
  # PNG decoding releases the GIL, so threads use every core.
  with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    results = list(pool.map(lambda p: _check_pair(p, num_classes), pairs))
  good = [pair for pair, problem in zip(pairs, results) if problem is None]
  problems += [problem for problem in results if problem is not None]
  if len(problems) == 1 and not skip_bad_pairs:
    raise BadDataError(f'{problems[0]} ({SKIP_HINT})')
  if problems and not skip_bad_pairs:
    raise BadDataError(
        f'{len(problems)} bad file(s) in {data_dir} ({SKIP_HINT}):\n  ' + '\n  '.join(problems))
  if problems:
    warnings.warn(
        f'skipping {len(problems)} bad pair(s) in {data_dir}:\n  ' + '\n  '.join(problems),
        stacklevel=2)
  if not good:
    raise BadDataError(f'{data_dir}: no valid image/mask pairs')
  return good


def fingerprint(data_dir: PathLike) -> str:
  """A hash of the names and sizes of the folder's files; changes when frames change."""
  data_dir = pathlib.Path(data_dir)
  digest = hashlib.sha256()
  for sub in (IMAGE_DIR, MASK_DIR):
    folder = data_dir / sub
    if folder.is_dir():
      for path in sorted(folder.iterdir()):
        if path.is_file():
          digest.update(f'{sub}/{path.name}:{path.stat().st_size}\n'.encode())
  return digest.hexdigest()


def class_pixel_counts(masks: Sequence[np.ndarray], num_classes: int = classes.NUM_CLASSES) -> np.ndarray:
  """int64 [num_classes] pixel counts over a sequence of index masks."""
  counts = np.zeros(num_classes, np.int64)
  for mask in masks:
    counts += np.bincount(np.asarray(mask).ravel(), minlength=num_classes)[:num_classes]
  return counts
