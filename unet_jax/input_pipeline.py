"""Input pipeline: prepared CARLA splits -> global batches sharded over 'data'.

`create_datasets(config, mesh)` returns one `SegmentationData` per split;
'train' reads the prepared splits named by `data.train_splits` (('train',
'validation') trains on the validation frames too: the model to deploy once
a recipe is chosen).
Every batch is a dict of global jax.Arrays sharded `P('data')`:
'image' float32 [B, H, W, 3] in [0, 1], 'label' int32 [B, h, w] (the model's
output size: centre-cropped for VALID padding) and 'valid' bool [B].

The order of a training epoch is a pure function of (seed, epoch), and so is
each example's augmentation, so `train_batches(epoch, first_step)` resumes a
run exactly. Row k of `epoch_uniforms` drives the k-th example of the epoch
(its slot), so a frame drawn twice in an epoch is augmented twice. Two
options shape training examples: `data.train_crop_size` trains on random
crops of the frames (scaled by `augment.scale_range` first) while evaluation
sees whole frames, and `data.rare_boost` draws frames holding rare classes
more often (`rare_frame_weights`), `data.augment.rare_windows` places that
share of the crops over a rare-class pixel, and `data.augment.copy_paste`
pastes the rare-class pixels of donor frames (drawn by rare content, per
slot, a pure function of (seed, epoch) like the rest) onto training
examples. Two ways to deliver batches:

* device cache: the preprocessed split lives on the devices as uint8
  (replicated) and one jitted function gathers and augments each batch there;
  the host only sends the batch's indices.
* streaming: grain reads the tfds ArrayRecord source, each process decodes
  and augments (numpy) only its own slice of every global batch, a
  background thread prefetches, and `jax.make_array_from_process_local_data`
  assembles the global arrays.

Resizing lives in `preprocessing` (shared with prediction), the augmentation
in `augmentation` (written once for numpy and jax.numpy, so both modes apply
the same transformations) and the batch schedules in `schedules`.
"""

from collections.abc import Callable, Iterator
import concurrent.futures
import functools
import os
import pathlib
import queue
import shutil
import tempfile
import threading

from absl import logging
import grain
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
from PIL import Image

from unet_jax import augmentation
from unet_jax import carla_dataset
from unet_jax import carla_files
from unet_jax import classes
from unet_jax import distributed
from unet_jax import errors
from unet_jax import models
from unet_jax import preprocessing
from unet_jax import schedules
from unet_jax import synthetic


# ------------------------------------------------------------------------------
# Delivery.


def _prefetch_in_thread(iterator: Iterator, transform: Callable, size: int) -> Iterator:
  """Runs `transform` over `iterator` in a background thread, `size` items ahead."""
  items = queue.Queue(maxsize=max(size, 1))
  stop = threading.Event()
  done = object()

  def produce():
    try:
      for item in iterator:
        item = transform(item)
        while not stop.is_set():
          try:
            items.put(item, timeout=0.1)
            break
          except queue.Full:
            pass
        if stop.is_set():
          return
      items.put(done)
    except BaseException as e:  # handed to the consumer, who raises it
      items.put(e)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while (item := items.get()) is not done:
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()


class SegmentationData:
  """One split, with its batches. See the module docstring."""

  def __init__(self, *, name: str, builder, image_size: tuple[int, int],
               label_size: tuple[int, int], global_batch_size: int, mesh: jax.sharding.Mesh,
               label_geometry: tuple[int, str] = (1, 'SAME'),
               seed: int, augment: augmentation.Augment, num_classes: int, device_cache: bool,
               prefetch_batches: int = 2, num_workers: int = 0, rare_classes=(),
               rare_boost: float = 0.0, splits: tuple[str, ...] = ()):
    self.name = name
    # The builder's splits read as this one: ('train', 'validation') trains on both.
    self.splits = tuple(splits) or (name,)
    self._source = carla_dataset.data_source(builder, '+'.join(self.splits))
    self._builder = builder
    self.num_examples = len(self._source)
    self.image_size = tuple(image_size)
    self.label_size = tuple(label_size)
    self.global_batch_size = global_batch_size
    self._mesh = mesh
    self._seed = seed
    self._augment = augment
    self._num_classes = num_classes
    self._prefetch = prefetch_batches
    self._num_workers = num_workers
    self._batch_sharding = NamedSharding(mesh, P('data'))
    self._replicated = NamedSharding(mesh, P())
    self._frame_counts = None
    self._rare_classes = tuple(rare_classes)
    self._rare_boost = float(rare_boost)
    # Training examples: the crop size, or whole frames.
    self.train_image_size = augment.crop_size or self.image_size
    self.train_label_size = (models.output_size(self.train_image_size, *label_geometry)
                             if augment.crop_size else self.label_size)
    training = name == 'train'
    self.steps_per_epoch = (self.num_examples // global_batch_size if training else
                            -(-self.num_examples // global_batch_size))
    if training and self.steps_per_epoch == 0:
      raise errors.UserError(f'the {name} split has {self.num_examples} examples, fewer than '
                             f'one batch of {global_batch_size}; lower config.batch_size or add '
                             'data')
    devices = mesh.shape['data']
    if global_batch_size % devices:
      raise ValueError(f'batch size {global_batch_size} is not divisible by the {devices} '
                       "devices of the mesh axis 'data'")
    self._cache = self._load_to_devices() if device_cache else None

  @property
  def device_cached(self) -> bool:
    return self._cache is not None

  # ---- host side ----

  def load_example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 image [H, W, 3] and uint8 label [H, W] at image_size (not cropped)."""
    example = self._source[int(index)]
    return preprocessing.resize_pair(example['image'], example['segmentation_mask'][..., 0], self.image_size)

  def _host_example(self, example):
    index, valid, uniforms, donor = example
    image, label = self.load_example(index)
    image = image.astype(np.float32) / 255.0
    label_size = self.label_size
    if donor is not None and donor[0] >= 0:
      donor_image, donor_label = self.load_example(donor[0])
      image, label = augmentation.paste_objects(
          np, image, label, donor_image.astype(np.float32) / 255.0, donor_label,
          self._rare_classes, bool(donor[1]))
    if uniforms is not None:
      image, label = augmentation.augment_example(np, image, label, uniforms, self._augment)
      label_size = self.train_label_size
    return {'image': image, 'label': preprocessing.centre_crop_label(label, label_size).astype(np.int32),
            'valid': np.bool_(valid)}

  def host_batches(self, indices: np.ndarray, valid: np.ndarray, *,
                   uniforms: np.ndarray | None = None, donors: np.ndarray | None = None,
                   process_index: int | None = None,
                   process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """numpy batches of this process's columns of the global [steps, B] schedule;
    each example augmented with its row of `uniforms` [steps, B, 7] if given,
    after receiving the objects of its donor in `donors` [steps, B, 2]
    (`schedules.paste_donors`) if given."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    columns = schedules.process_columns(self.global_batch_size, process_index, process_count)
    size = indices[:, columns].size
    rows = ([None] * size if uniforms is None
            else list(uniforms[:, columns].reshape(-1, augmentation.NUM_AUGMENT_UNIFORMS)))
    pastes = [None] * size if donors is None else donors[:, columns].reshape(-1, 2).tolist()
    local = list(zip(indices[:, columns].ravel().tolist(), valid[:, columns].ravel().tolist(),
                     rows, pastes))
    if not local:
      return iter(())
    local_batch = columns.stop - columns.start
    dataset = grain.MapDataset.source(local).map(self._host_example)
    iterable = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=os.cpu_count() or 1,
        prefetch_buffer_size=max(self._prefetch, 1) * local_batch)).batch(local_batch)
    if self._num_workers > 0:
      iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
    return iter(iterable)

  def _stream(self, indices, valid, *, uniforms, donors=None):
    image_size, label_size = ((self.image_size, self.label_size) if uniforms is None
                              else (self.train_image_size, self.train_label_size))
    global_shapes = {
        'image': (self.global_batch_size, *image_size, 3),
        'label': (self.global_batch_size, *label_size),
        'valid': (self.global_batch_size,),
    }

    def to_global(batch):
      return {key: jax.make_array_from_process_local_data(self._batch_sharding, value,
                                                          global_shapes[key])
              for key, value in batch.items()}

    return _prefetch_in_thread(self.host_batches(indices, valid, uniforms=uniforms, donors=donors),
                               to_global, self._prefetch)

  # ---- device cache ----

  def _load_to_devices(self):
    # PNG decoding and PIL resizing release the GIL.
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
      examples = list(pool.map(self.load_example, range(self.num_examples)))
    images = np.stack([image for image, _ in examples])
    labels = np.stack([label for _, label in examples])
    self._frame_counts = self._count_frames(preprocessing.centre_crop_label(labels, self.label_size))
    put = lambda x: jax.make_array_from_process_local_data(self._replicated, x, x.shape)
    return {'images': put(images), 'labels': put(labels),
            'gather': jax.jit(functools.partial(_gather_batch, augment=self._augment,
                                                paste_classes=self._rare_classes,
                                                label_size=self.label_size,
                                                train_label_size=self.train_label_size),
                              static_argnames='training',
                              out_shardings=(self._batch_sharding, self._replicated))}

  def _from_cache(self, indices, valid, *, uniforms, donors=None):
    cache = self._cache
    put = lambda x: jax.make_array_from_process_local_data(self._replicated, x, x.shape)
    training = uniforms is not None
    # The same per-slot draws as the streaming path, so both modes train
    # identically; one table an epoch, indexed on the devices.
    uniforms = put(uniforms if training else np.zeros((1, 1, augmentation.NUM_AUGMENT_UNIFORMS), np.float32))
    donors = put(donors if donors is not None else np.full((1, 1, 2), -1, np.int32))
    # The epoch's whole schedule goes to the devices once and the row counter
    # stays there: each step is one dispatch and no host-to-device copy (on
    # a GPU two small copies a step cost more than its short step hides).
    epoch_indices, epoch_valid = put(indices.astype(np.int32)), put(valid)
    row = put(np.int32(0))
    for _ in range(len(indices)):
      batch, row = cache['gather'](cache['images'], cache['labels'], uniforms, donors,
                                   epoch_indices, epoch_valid, row, training=training)
      yield batch

  # ---- public ----

  def sampling_weights(self) -> np.ndarray | None:
    """The training draw's per-example weights (`schedules.rare_frame_weights`); None: each once."""
    if not self._rare_boost or not self._rare_classes:
      return None
    return schedules.rare_frame_weights(self.frame_class_counts(), self._rare_classes, self._rare_boost)

  def donor_content(self) -> np.ndarray:
    """Each frame's rare content (`schedules.rare_content`): copy-paste draws donors by it."""
    return schedules.rare_content(self.frame_class_counts(), self._rare_classes)

  def train_batches(self, epoch: int, first_step: int = 0) -> Iterator[dict[str, jax.Array]]:
    """Augmented batches of one epoch in the (seed, epoch) order, from step first_step."""
    indices = schedules.train_schedule(self.num_examples, self.global_batch_size, self._seed, epoch,
                             self.sampling_weights())
    uniforms = donors = None
    if self._augment.enabled:
      uniforms = augmentation.epoch_uniforms(self.num_examples, self._seed, epoch)[:indices.size]
      uniforms = uniforms.reshape(*indices.shape, augmentation.NUM_AUGMENT_UNIFORMS)[first_step:]
    if self._augment.copy_paste > 0:
      donors = schedules.paste_donors(self.donor_content(), indices.size, self._augment.copy_paste,
                                      self._seed, epoch)
      donors = donors.reshape(*indices.shape, 2)[first_step:]
    indices = indices[first_step:]
    valid = np.ones(indices.shape, bool)
    deliver = self._from_cache if self.device_cached else self._stream
    return deliver(indices, valid, uniforms=uniforms, donors=donors)

  def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
    """Every example once, in order, not augmented; padding in the last batch has valid=False."""
    indices, valid = schedules.eval_schedule(self.num_examples, self.global_batch_size)
    deliver = self._from_cache if self.device_cached else self._stream
    return deliver(indices, valid, uniforms=None)

  def _count_frames(self, labels) -> np.ndarray:
    return np.stack([np.bincount(np.asarray(label).ravel(), minlength=self._num_classes)
                     [:self._num_classes] for label in labels]).astype(np.int64)

  def frame_class_counts(self) -> np.ndarray:
    """int64 [num_examples, num_classes]: label pixels per class of each frame, at label_size."""
    if self._frame_counts is None:
      masks = carla_dataset.mask_source(self._builder, '+'.join(self.splits))
      # The image stays encoded; only masks are decoded.
      def count(index):
        mask = masks[index]['segmentation_mask'][..., 0]
        if mask.shape != self.image_size:
          mask = np.asarray(Image.fromarray(mask).resize(self.image_size[::-1],
                                                         Image.Resampling.NEAREST))
        return preprocessing.centre_crop_label(mask, self.label_size)
      with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        self._frame_counts = self._count_frames(pool.map(count, range(self.num_examples)))
    return self._frame_counts.copy()

  def frame_names(self) -> list[str]:
    """The name of each example, in the order eval_batches delivers them."""
    return carla_dataset.frame_names(self._builder, '+'.join(self.splits))

  def class_pixel_counts(self) -> np.ndarray:
    """int64 [num_classes]: label pixels per class over the split, at label_size."""
    return self.frame_class_counts().sum(axis=0)


def _gather_batch(images, labels, uniforms, donors, epoch_indices, epoch_valid, row, *,
                  augment: augmentation.Augment, paste_classes, label_size, train_label_size,
                  training: bool):
  """Device side: gathers the cached examples of `row` of the epoch's schedule,
  pastes their donors' objects (`donors` [steps, B, 2], training with
  copy-paste), augments them (training) with their rows of `uniforms`
  [steps, B, 7] and crops labels. Returns the batch and the next row."""
  indices, valid = epoch_indices[row], epoch_valid[row]
  image = images[indices].astype(jnp.float32) / 255.0
  label = labels[indices]
  if training and augment.copy_paste > 0:
    donor, mirrored = donors[row, :, 0], donors[row, :, 1] > 0
    safe = jnp.maximum(donor, 0)
    paste = lambda x, y, dx, dy, m, p: augmentation.paste_objects(jnp, x, y, dx, dy, paste_classes,
                                                                 m, p)
    image, label = jax.vmap(paste)(image, label, images[safe].astype(jnp.float32) / 255.0,
                                   labels[safe], mirrored, donor >= 0)
  if training:
    image, label = jax.vmap(lambda x, y, u: augmentation.augment_example(jnp, x, y, u, augment))(
        image, label, uniforms[row])
    label_size = train_label_size
  return {'image': image, 'label': preprocessing.centre_crop_label(label, label_size).astype(jnp.int32),
          'valid': valid}, row + 1


# ------------------------------------------------------------------------------
# Entry point.


def _has_frames(data_dir: pathlib.Path) -> bool:
  folder = data_dir / carla_files.IMAGE_DIR
  return folder.is_dir() and any(folder.glob('*.png'))


def write_synthetic_scenes(data_dir: pathlib.Path, num_scenes: int, seed: int) -> None:
  """Fills an empty or missing `data_dir` with synthetic scenes; leaves one with frames alone.

  The scenes are written into a hidden sibling folder that is then renamed
  into place: a run interrupted while writing leaves no partial set to be
  mistaken for the data next time, and of runs writing at once (side by side
  on a fresh machine) the first to finish wins and the others use its scenes.
  """
  if _has_frames(data_dir):
    return
  if data_dir.is_dir() and any(data_dir.iterdir()):
    raise errors.UserError(f'{data_dir}: holds no frames in {carla_files.IMAGE_DIR}/ but is not '
                           'empty; synthetic scenes go to a new or empty folder')
  try:
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = pathlib.Path(tempfile.mkdtemp(prefix=f'.{data_dir.name}.', suffix='.partial',
                                            dir=data_dir.parent))
  except OSError as error:
    raise errors.UserError(f'{data_dir}: cannot write scenes there ({error.strerror or error})'
                           ) from error
  try:
    synthetic.write_scenes(partial, num_scenes, seed=seed)
    try:
      os.rename(partial, data_dir)  # replaces a missing or empty folder, atomically
    except OSError as error:
      if not _has_frames(data_dir):  # not another run's scenes: a real failure
        raise errors.UserError(f'{data_dir}: cannot move the scenes there '
                               f'({error.strerror or error})') from error
  finally:
    shutil.rmtree(partial, ignore_errors=True)


def _cache_megabytes(num_examples: int, image_size) -> float:
  return num_examples * image_size[0] * image_size[1] * 4 / 2**20  # uint8 RGB + label


def create_datasets(config, mesh: jax.sharding.Mesh) -> dict[str, SegmentationData]:
  """Validates, prepares and loads the splits named by config.data (see module docstring)."""
  data = config.data
  data_dir = pathlib.Path(data.data_dir)
  image_size = tuple(int(n) for n in data.image_size)
  label_size = models.label_size(config.model, image_size)
  if data.synthetic_scenes > 0 and not _has_frames(data_dir):
    distributed.process_0_first(
        lambda: write_synthetic_scenes(data_dir, data.synthetic_scenes, config.seed),
        'writing the synthetic scenes')
  builder = distributed.process_0_first(lambda: carla_dataset.prepare(
      data_dir, prepared_dir=data.prepared_dir, split_key=data.split_key,
      validation_fraction=data.validation_fraction, test_fraction=data.test_fraction,
      validation_groups=tuple(data.get('validation_groups', ())),
      exclude_frames=tuple(data.get('exclude_frames', ())),
      exclude_groups=tuple(data.get('exclude_groups', ())),
      skip_bad_pairs=data.skip_bad_pairs, num_classes=config.model.num_classes),
      'preparing the frames')
  sizes = carla_dataset.split_sizes(builder)
  train_splits = tuple(data.get('train_splits', ('train',)))  # checked by config_checks
  if data.device_cache not in ('auto', 'always', 'never'):
    raise ValueError(f"config.data.device_cache must be 'auto', 'always' or 'never', "
                     f'got {data.device_cache!r}')
  cached_examples = sum(sizes.values()) + sum(sizes[s] for s in train_splits if s != 'train')
  total_mb = _cache_megabytes(cached_examples, image_size)
  device_cache = (data.device_cache == 'always' or
                  data.device_cache == 'auto' and total_mb <= data.device_cache_max_mb)
  rare_ids = [classes.CLASS_NAMES.index(c) for c in data.get('rare_classes', ())]
  return {
      name: SegmentationData(
          name=name, builder=builder, image_size=image_size, label_size=label_size,
          label_geometry=(config.model.depth, config.model.padding),
          global_batch_size=config.batch_size, mesh=mesh, seed=config.seed,
          augment=augmentation.Augment.from_config(data.augment, data.get('train_crop_size'),
                                                   rare_ids),
          num_classes=config.model.num_classes, device_cache=device_cache,
          prefetch_batches=data.prefetch_batches, num_workers=data.num_workers,
          rare_classes=rare_ids,
          rare_boost=data.get('rare_boost', 0.0),
          splits=train_splits if name == 'train' else (name,))
      for name in carla_dataset.SPLITS if name in sizes
  }


def folder_dataset(config, mesh: jax.sharding.Mesh, data_dir,
                   prepared_dir: str = '') -> SegmentationData:
  """Every valid pair of a CARLA-format folder as one evaluation split.

  The pairs are prepared and preprocessed exactly as the config's own splits
  (image and label size, class count, bad-pair policy), with nothing held out:
  they all land in the builder's 'train' split. It is read as 'train[:100%]'
  (the same examples) so that SegmentationData batches it as an evaluation
  split: every example once, the last batch padded, any number of frames.

  The config's `data.exclude_frames` apply here too: they name frames (such
  as those whose mask belongs to another frame), and a frame of that name in
  this folder is left out, as training and its evaluation left it out. Names
  the folder does not hold are passed over (they were checked against the
  training folder; another folder need not hold them), so a folder of other
  recordings that reuses such a name loses that frame as well.
  `data.exclude_groups` does not: it shapes the training folder's split, and
  a folder given here is scored whole.
  """
  data = config.data
  image_size = tuple(int(n) for n in data.image_size)
  label_size = models.label_size(config.model, image_size)
  excluded = tuple(data.get('exclude_frames', ()))
  if excluded:
    names = {pair.name for pair in carla_files.list_pairs(data_dir)[0]}
    excluded = tuple(name for name in excluded if name in names)
    if excluded:
      logging.info('Leaving out %d frame(s) of %s named by data.exclude_frames: %s',
                   len(excluded), data_dir, ', '.join(excluded))
  builder = distributed.process_0_first(lambda: carla_dataset.prepare(
      data_dir, prepared_dir=prepared_dir, split_key='name', validation_fraction=0.0,
      test_fraction=0.0, exclude_frames=excluded, skip_bad_pairs=data.skip_bad_pairs,
      num_classes=config.model.num_classes), 'preparing the frames')
  num_examples = carla_dataset.split_sizes(builder)['train']
  device_cache = (data.device_cache == 'always' or data.device_cache == 'auto' and
                  _cache_megabytes(num_examples, image_size) <= data.device_cache_max_mb)
  return SegmentationData(
      name='train[:100%]', builder=builder, image_size=image_size, label_size=label_size,
      global_batch_size=config.batch_size, mesh=mesh, seed=config.seed, augment=augmentation.Augment(),
      num_classes=config.model.num_classes, device_cache=device_cache,
      prefetch_batches=data.prefetch_batches, num_workers=data.num_workers)
