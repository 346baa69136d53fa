"""A tensorflow-datasets builder for a CARLA-format folder, and its splits.

The user's folder is the builder's manual directory, only ever read. `prepare`
validates every pair, writes ArrayRecord files into a cache outside it
(`config.data.prepared_dir`, else `$UNET_JAX_CACHE`, else
`$XDG_CACHE_HOME/unet_jax`, else `~/.cache/unet_jax`) and returns the builder; `data_source` reads a
split back with random access and no TensorFlow.

Splits are assigned by a stable hash (sha256) of a group key: the recording
block (first three characters of the name, the default) or the name itself;
or the validation split is named outright (`validation_groups`), the rest
training (and test, by hash). Frames named in `exclude_frames` (e.g. those
whose mask belongs to another frame), and every frame of the groups named in
`exclude_groups` (recordings kept out of an experiment), are left out of
every split; the others keep the split they would have without them.
CARLA frames come from video, so a split by frame would leak near-identical
neighbours into validation; and since a frame's split depends only on its
own key, adding frames never moves existing ones.

The builder config's name carries the split settings and a fingerprint of
the folder (file names and sizes), so changed data or settings give a new
prepared copy instead of a stale one. Processes preparing into one cache at
once (runs started side by side on a fresh machine) take turns on a file
lock there, and those that waited find the copy made.
"""

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import os
import pathlib
import shutil

from absl import logging
import tensorflow_datasets as tfds

from unet_jax import carla_files
from unet_jax import classes
from unet_jax import errors

SPLIT_KEYS = ('recording', 'name')


class SplitError(errors.UserError, ValueError):
  """The split settings leave a split empty or no frames for training."""
SPLITS = ('train', 'validation', 'test')


def group_key(name: str, split_key: str) -> str:
  if split_key == 'recording':
    return name[:3]
  if split_key == 'name':
    return name
  raise ValueError(f"split_key must be one of {SPLIT_KEYS}, got {split_key!r}")


def split_of(name: str, split_key: str, validation_fraction: float, test_fraction: float,
             validation_groups=()) -> str:
  """'train', 'validation' or 'test' for a frame name: a pure function of its group key.

  With `validation_groups` the frames of those groups validate and
  `validation_fraction` is not used; the others train or, by hash, test.
  """
  key = group_key(name, split_key)
  if validation_groups:
    if key in validation_groups:
      return 'validation'
    validation_fraction = 0.0
  digest = hashlib.sha256(key.encode()).digest()
  u = int.from_bytes(digest[:8], 'big') / 2.0**64  # uniform in [0, 1)
  if u < test_fraction:
    return 'test'
  if u < test_fraction + validation_fraction:
    return 'validation'
  return 'train'


def assign_splits(names, split_key: str, validation_fraction: float,
                  test_fraction: float, validation_groups=()) -> dict[str, list[str]]:
  """Names per split; a split whose fraction is 0 is absent, an empty one is an error.

  `validation_groups` (group keys, e.g. recordings '001', '007') names the
  validation split outright; each must occur among the names.
  """
  validation_groups = tuple(validation_groups)
  if validation_groups:
    keys = sorted({group_key(n, split_key) for n in names})
    missing = sorted(set(validation_groups) - set(keys))
    if missing:
      raise SplitError(
          f'validation_groups names {", ".join(map(repr, missing))}, but no frame has that '
          f'{split_key} key (the data holds {len(keys)}: '
          f'{", ".join(keys[:20])}{", ..." if len(keys) > 20 else ""})')
  elif min(validation_fraction, test_fraction) < 0 or validation_fraction + test_fraction >= 1:
    raise SplitError(f'validation_fraction={validation_fraction} and test_fraction={test_fraction} '
                     'must be >= 0 and leave a positive fraction for training')
  if not 0 <= test_fraction < 1:
    raise SplitError(f'test_fraction={test_fraction} must be in [0, 1)')
  present = {'train': True, 'validation': bool(validation_groups) or validation_fraction > 0,
             'test': test_fraction > 0}
  splits = {s: [] for s in SPLITS if present[s]}
  for name in names:
    splits[split_of(name, split_key, validation_fraction, test_fraction,
                    validation_groups)].append(name)
  empty = [s for s, members in splits.items() if not members]
  if empty:
    groups = len({group_key(n, split_key) for n in names})
    remedies = ['set config.data.validation_fraction / test_fraction to other values (0 drops '
                'a split)', 'add frames']
    if split_key != 'name':
      remedies.insert(0, "use config.data.split_key='name' to split frame by frame")
    reason = 'none hashed into them'
    if validation_groups:
      remedies.insert(0, 'name fewer config.data.validation_groups')
      reason = (f'validation_groups names {len(set(validation_groups))} of them and no other '
                'landed there')
    raise SplitError(
        f'split(s) {", ".join(empty)} would be empty: {len(names)} frames form only {groups} '
        f'group(s) by split_key={split_key!r}, and {reason}. To fix it, '
        + ', or '.join(remedies) + '.')
  return splits


@dataclasses.dataclass
class CarlaConfig(tfds.core.BuilderConfig):
  split_key: str = 'recording'
  validation_fraction: float = 0.15
  test_fraction: float = 0.15
  validation_groups: tuple[str, ...] = ()
  exclude_frames: tuple[str, ...] = ()  # frame names left out of every split
  skip_bad_pairs: bool = False
  num_classes: int = classes.NUM_CLASSES
  content: str = ''  # carla_files.fingerprint of the folder


def builder_config(data_dir, *, split_key='recording', validation_fraction=0.15,
                   test_fraction=0.15, validation_groups=(), exclude_frames=(),
                   skip_bad_pairs=False, num_classes=classes.NUM_CLASSES) -> CarlaConfig:
  content = carla_files.fingerprint(data_dir)
  group_key('000000', split_key)  # validates split_key early
  validation_groups = tuple(sorted(set(validation_groups)))
  if validation_groups:  # the named groups replace the validation fraction in the name
    groups = hashlib.sha256('+'.join(validation_groups).encode()).hexdigest()
    validation = f'valg{len(validation_groups)}x{groups[:8]}'
  else:
    validation = f'val{validation_fraction:g}'
  # Left-out frames get their own copy; with none the name is what it always
  # was, so copies prepared before the option existed stay valid. File stems
  # hold no '/', so joining on it is unambiguous.
  exclude_frames = tuple(sorted(set(exclude_frames)))
  excluded = ''
  if exclude_frames:
    frames = hashlib.sha256('/'.join(exclude_frames).encode()).hexdigest()
    excluded = f'-x{len(exclude_frames)}x{frames[:8]}'
  # The folder's own hash keeps copies of different folders apart when they
  # share a prepared_dir; the content hash tells old copies from new.
  folder = hashlib.sha256(os.fspath(pathlib.Path(data_dir).resolve()).encode()).hexdigest()
  name = (f'{split_key}-{validation}-test{test_fraction:g}'
          f'{"-skipbad" if skip_bad_pairs else ""}{excluded}-c{num_classes}-{folder[:8]}-'
          f'{content[:16]}')
  return CarlaConfig(name=name, split_key=split_key, validation_fraction=validation_fraction,
                     test_fraction=test_fraction, validation_groups=validation_groups,
                     exclude_frames=exclude_frames, skip_bad_pairs=skip_bad_pairs,
                     num_classes=num_classes, content=content)


def _check_excluded(data_dir, exclude_frames) -> None:
  """Every name in `exclude_frames` is a frame of the folder: a typo is never silently ignored.

  A pair skipped as bad (`skip_bad_pairs`) still counts as a frame.
  """
  names = {pair.name for pair in carla_files.list_pairs(data_dir)[0]}
  unknown = [name for name in exclude_frames if name not in names]
  if unknown:
    raise SplitError(f'data.exclude_frames names {", ".join(map(repr, unknown))}, which '
                     f'{"is not a frame" if len(unknown) == 1 else "are not frames"} of '
                     f'{data_dir}')


def _example(pair: carla_files.Pair, num_classes: int) -> tuple[str, dict]:
  image, mask = carla_files.read_pair(pair, num_classes)
  # PNG bytes keep TensorFlow out of preparation: tfds encodes arrays with TF.
  # RGB files go in as they are; others (RGBA, grey) are re-encoded as RGB.
  image_bytes = pair.image_path.read_bytes()
  if carla_files.png_mode(image_bytes) != 'RGB':
    image_bytes = carla_files.encode_png(image)
  return pair.name, {
      'image': image_bytes,
      'segmentation_mask': carla_files.encode_png(mask),  # grayscale PNG: [H, W, 1] on decoding
      'file_name': pair.name,
  }


class CarlaScenes(tfds.core.GeneratorBasedBuilder):
  """CARLA semantic segmentation frames from a local folder."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Pass the dataset folder as the manual dir: it holds CameraRGB/<name>.png and '
      'CameraMask/<name>.png (mask class index in channel 0).')
  # Nothing is downloaded, so there are no checksums. Left to tfds, the lookup
  # for a checksums file beside this module imports `importlib_resources`,
  # which is not a dependency.
  url_infos = None

  # tfds prints its download banners to stdout; this builder downloads nothing.
  def _log_download_bytes(self) -> None:
    logging.info('Preparing the frames once, into %s', self.data_dir)

  def _log_download_done(self) -> None:
    logging.info('Prepared.')

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
            'segmentation_mask': tfds.features.Image(
                shape=(None, None, 1), encoding_format='png', use_colormap=True),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'segmentation_mask'),
        metadata=tfds.core.MetadataDict(
            class_names=list(classes.CLASS_NAMES[:self.builder_config.num_classes]),
            split_key=self.builder_config.split_key,
            content=self.builder_config.content),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config = self.builder_config
    if config.exclude_frames:  # a typo fails before every pair is decoded
      _check_excluded(dl_manager.manual_dir, config.exclude_frames)
    pairs = carla_files.validate_pairs(dl_manager.manual_dir, config.num_classes,
                                       config.skip_bad_pairs)
    by_name = {pair.name: pair for pair in pairs}
    for name in config.exclude_frames:
      by_name.pop(name, None)  # absent if skipped as a bad pair
    try:
      splits = assign_splits(list(by_name), config.split_key, config.validation_fraction,
                             config.test_fraction, config.validation_groups)
    except SplitError as error:
      if not config.exclude_frames:
        raise
      raise SplitError(f'{error} (config.data.exclude_frames / exclude_groups leave out '
                       f'{len(config.exclude_frames)} frame(s))') from error
    return {split: self._generate_examples([by_name[n] for n in names])
            for split, names in splits.items()}

  def _generate_examples(self, pairs):
    num_classes = self.builder_config.num_classes
    # Decoding and re-encoding PNGs releases the GIL; threads use every core.
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
      yield from pool.map(lambda pair: _example(pair, num_classes), pairs)


def cache_root() -> pathlib.Path:
  """Where prepared copies go by default: never into the data folder, which may be read-only."""
  if os.environ.get('UNET_JAX_CACHE'):
    return pathlib.Path(os.environ['UNET_JAX_CACHE'])
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(base) / 'unet_jax'


def prepared_root(data_dir, prepared_dir: str = '') -> pathlib.Path:
  """The prepared copies' folder. Copies of different data folders share it
  (each builder config's name carries its folder's hash)."""
  del data_dir  # the folder's hash is in the builder config's name
  return pathlib.Path(prepared_dir) if prepared_dir else cache_root() / 'prepared'


def _remove_stale_copies(builder: CarlaScenes) -> None:
  """Deletes copies prepared from earlier contents of this folder: nothing can read them again.

  Copies of the current content with other split settings stay, for runs
  that use them, and so do copies of other folders sharing the prepared_dir.
  """
  config_dir = pathlib.Path(builder.data_dir).parent.parent
  folder, content = builder.builder_config.name.split('-')[-2:]
  for other in config_dir.iterdir():
    if other.is_dir() and other.name.split('-')[-2:-1] == [folder] and not other.name.endswith(content):
      shutil.rmtree(other, ignore_errors=True)


def frames_of_groups(names, groups, split_key: str, validation_groups=()) -> tuple[str, ...]:
  """The names whose group key is one of `groups` (e.g. recordings '000', '007').

  Each group must hold a frame, and none may also be a validation group: a
  typo or a contradiction stops preparation instead of being ignored.
  """
  groups = tuple(groups)
  keys = sorted({group_key(n, split_key) for n in names})
  missing = [g for g in groups if g not in keys]
  if missing:
    raise SplitError(
        f'data.exclude_groups names {", ".join(map(repr, missing))}, but no frame has that '
        f'{split_key} key (the data holds {len(keys)}: '
        f'{", ".join(keys[:20])}{", ..." if len(keys) > 20 else ""})')
  both = [g for g in groups if g in tuple(validation_groups)]
  if both:
    raise SplitError(f'data.exclude_groups and data.validation_groups both name '
                     f'{", ".join(map(repr, both))}: a group cannot validate and be left out')
  return tuple(n for n in names if group_key(n, split_key) in groups)


def prepare(data_dir, *, prepared_dir: str = '', split_key: str = 'recording',
            validation_fraction: float = 0.15, test_fraction: float = 0.15,
            validation_groups=(), exclude_frames=(), exclude_groups=(),
            skip_bad_pairs: bool = False,
            num_classes: int = classes.NUM_CLASSES) -> CarlaScenes:
  """Validates and prepares the folder (once per content and settings); returns the builder.

  `exclude_frames`: frame names (file stems) left out of every split; each
  must be a frame of the folder. `exclude_groups`: group keys (recordings,
  with split_key='recording') whose frames are all left out; the copy is the
  one that `exclude_frames` listing those frames would give.
  """
  data_dir = pathlib.Path(data_dir)
  # A missing or empty folder fails before anything is written.
  pairs = carla_files.list_pairs(data_dir)[0]
  group_key('000000', split_key)  # validates split_key before it is used
  if exclude_groups:
    exclude_frames = tuple(exclude_frames) + frames_of_groups(
        [pair.name for pair in pairs], exclude_groups, split_key, validation_groups)
  config = builder_config(data_dir, split_key=split_key, validation_fraction=validation_fraction,
                          test_fraction=test_fraction, validation_groups=validation_groups,
                          exclude_frames=exclude_frames, skip_bad_pairs=skip_bad_pairs,
                          num_classes=num_classes)
  root = prepared_root(data_dir, prepared_dir)
  try:
    root.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise carla_files.BadDataError(
        f'{root}: cannot create the folder for prepared data ({error.strerror or error}); set '
        'config.data.prepared_dir or UNET_JAX_CACHE to a writable folder') from error
  if not os.access(root, os.W_OK):
    raise carla_files.BadDataError(
        f'{root}: the folder for prepared data is not writable; set config.data.prepared_dir '
        'or UNET_JAX_CACHE to a writable folder')
  with _preparing(root):
    builder = CarlaScenes(data_dir=root, config=config)
    builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(data_dir)))
    _remove_stale_copies(builder)
  return builder


@contextlib.contextmanager
def _preparing(root: pathlib.Path):
  """Holds `root`'s lock: processes preparing at once (runs started side by side
  on a fresh cache) take turns, and those that waited find the copy made."""
  with open(root / '.lock', 'a') as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info('Another process is preparing data in %s; waiting for it', root)
      fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def data_source(builder: CarlaScenes, split: str):
  """Random-access ArrayRecord source of decoded examples (numpy, no TensorFlow)."""
  return builder.as_data_source(split=split)


def mask_source(builder: CarlaScenes, split: str):
  """Like `data_source`, but leaves images encoded: for passes that only need masks."""
  return builder.as_data_source(split=split, decoders={'image': tfds.decode.SkipDecoding()})


def frame_names(builder: CarlaScenes, split: str) -> list[str]:
  """The frame name of each example of `split`, in the source's order (nothing decoded)."""
  skip = tfds.decode.SkipDecoding()
  source = builder.as_data_source(split=split,
                                  decoders={'image': skip, 'segmentation_mask': skip})
  names = (source[index]['file_name'] for index in range(len(source)))
  return [name.decode() if isinstance(name, bytes) else str(name) for name in names]


def class_names(builder: CarlaScenes) -> list[str]:
  return list(builder.info.metadata['class_names'])


def split_sizes(builder: CarlaScenes) -> dict[str, int]:
  return {name: info.num_examples for name, info in builder.info.splits.items()}
