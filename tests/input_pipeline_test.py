"""The input pipeline: preprocessing, augmentation, order, sharding, both delivery modes."""

import collections
import concurrent.futures
import os
import pathlib
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import carla
from unet_jax import augmentation
from unet_jax import carla_dataset
from unet_jax import carla_files
from unet_jax import errors
from unet_jax import input_pipeline as ip
from unet_jax import models
from unet_jax import preprocessing
from unet_jax import schedules
from unet_jax import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
GEOMETRY = augmentation.Augment(horizontal_flip=True, scale_range=(1.2, 2.0))


def _config(data_dir, **data):
  config = carla.get_config()
  config.data.data_dir = str(data_dir)
  config.data.image_size = (32, 48)
  config.data.split_key = 'name'
  config.data.validation_fraction = 0.25
  config.data.test_fraction = 0.25
  config.model.depth = 2
  config.batch_size = 4
  config.data.augment.update(horizontal_flip=False, scale_range=(1.0, 1.0), brightness=0.0,
                             contrast=0.0, saturation=0.0)
  for key, value in data.items():
    config.data[key] = value
  return config


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
  root = tmp_path_factory.mktemp('scenes')
  synthetic.write_scenes(root, 30, seed=0, size=(48, 64))  # resized to 32x48 by the pipeline
  return root


@pytest.fixture(scope='module')
def mesh():
  return jax.sharding.Mesh(np.array(jax.devices()), ('data',))  # as unet_jax.train builds it


@pytest.fixture(scope='module', params=['always', 'never'])
def datasets(request, scenes, mesh):
  config = _config(scenes, device_cache=request.param)
  config.data.augment.horizontal_flip = True
  config.data.augment.scale_range = (1.0, 1.5)
  config.data.augment.brightness = 0.1
  return ip.create_datasets(config, mesh)


def _numpy(batches):
  return [{k: np.asarray(v) for k, v in batch.items()} for batch in batches]


# ---- preprocessing -------------------------------------------------------------


def test_mask_resize_is_nearest_and_image_resize_antialiased():
  rng = np.random.default_rng(0)
  mask = rng.choice(np.array([1, 7, 13, 22], np.uint8), size=(48, 64))
  checker = (np.indices((48, 64)).sum(0) % 2 * 255).astype(np.uint8)
  image = np.repeat(checker[..., None], 3, -1)
  small_image, small_mask = preprocessing.resize_pair(image, mask, (12, 16))
  assert small_mask.shape == (12, 16) and small_image.shape == (12, 16, 3)
  assert set(np.unique(small_mask)) <= {1, 7, 13, 22}
  # A one-pixel checkerboard shrunk 4x averages to grey instead of aliasing to black/white.
  assert np.abs(small_image.astype(float) - 127.5).max() < 20
  # Upsizing the mask also invents no label.
  _, big_mask = preprocessing.resize_pair(image, mask, (96, 128))
  assert set(np.unique(big_mask)) <= set(np.unique(mask))


def test_valid_padding_label_is_the_centre_crop():
  label = np.arange(36 * 52).reshape(36, 52)
  size = models.output_size((36, 52), depth=1, padding='VALID')
  cropped = preprocessing.centre_crop_label(label, size)
  assert cropped.shape == size == (20, 36)
  assert cropped[0, 0] == label[8, 8] and cropped[-1, -1] == label[27, 43]


# ---- augmentation --------------------------------------------------------------


def _label_coded_example():
  """Blocky labels, and an image whose red channel encodes the label."""
  rng = np.random.default_rng(1)
  label = np.kron(rng.integers(0, 23, (8, 12)), np.ones((4, 4), np.int64)).astype(np.uint8)
  image = rng.random((32, 48, 3), dtype=np.float32)
  image[..., 0] = label * 10 / 255
  return image, label


def _interior(label):
  """Pixels whose 3x3 neighbourhood has one label (bilinear blends only at edges).

  The image border never counts: its outer neighbours are unknown.
  """
  padded = np.pad(label.astype(np.int32), 1, constant_values=-1)
  windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3))
  return (windows == label[..., None, None]).all((-1, -2))


@pytest.mark.parametrize('xp', [np, jnp], ids=['numpy', 'jax'])
def test_geometry_moves_image_and_label_together(xp):
  image, label = _label_coded_example()
  for seed in range(6):
    uniforms = np.random.default_rng(seed).random(augmentation.NUM_AUGMENT_UNIFORMS).astype(np.float32)
    out_image, out_label = map(np.asarray, augmentation.augment_example(
        xp, xp.asarray(image), xp.asarray(label), xp.asarray(uniforms), GEOMETRY))
    assert out_label.shape == label.shape
    assert set(np.unique(out_label)) <= set(np.unique(label))
    inside = _interior(out_label)
    assert inside.mean() > 0.3
    decoded = np.round(out_image[..., 0] * 255 / 10)
    np.testing.assert_array_equal(decoded[inside], out_label[inside])


def test_flip_without_scaling_mirrors_exactly():
  image, label = _label_coded_example()
  flip_only = augmentation.Augment(horizontal_flip=True)
  uniforms = np.zeros(augmentation.NUM_AUGMENT_UNIFORMS, np.float32)  # u[0] < 0.5: flip
  out_image, out_label = augmentation.augment_example(np, image, label, uniforms, flip_only)
  np.testing.assert_array_equal(out_label, label[:, ::-1])
  np.testing.assert_allclose(out_image, image[:, ::-1], atol=1e-6)
  uniforms[0] = 0.9  # no flip
  out_image, out_label = augmentation.augment_example(np, image, label, uniforms, flip_only)
  np.testing.assert_array_equal(out_label, label)


def test_colour_jitter_changes_the_image_only():
  image, label = _label_coded_example()
  jitter = augmentation.Augment(brightness=0.2, contrast=0.3, saturation=0.3)
  uniforms = np.full(augmentation.NUM_AUGMENT_UNIFORMS, 0.9, np.float32)
  out_image, out_label = augmentation.augment_example(np, image, label, uniforms, jitter)
  np.testing.assert_array_equal(out_label, label)
  assert np.abs(out_image - image).mean() > 0.05
  assert out_image.min() >= 0 and out_image.max() <= 1


def test_numpy_and_jax_augmentations_agree():
  image, label = _label_coded_example()
  everything = augmentation.Augment(True, (0.8, 1.6), 0.2, 0.3, 0.3)
  uniforms = np.random.default_rng(3).random(augmentation.NUM_AUGMENT_UNIFORMS).astype(np.float32)
  np_image, np_label = augmentation.augment_example(np, image, label, uniforms, everything)
  jax_image, jax_label = augmentation.augment_example(jnp, jnp.asarray(image), jnp.asarray(label),
                                            jnp.asarray(uniforms), everything)
  np.testing.assert_array_equal(np_label, np.asarray(jax_label))
  np.testing.assert_allclose(np_image, np.asarray(jax_image), atol=1e-4)


# ---- order ---------------------------------------------------------------------


def test_order_is_a_function_of_seed_and_epoch():
  first = schedules.train_schedule(103, 8, seed=0, epoch=3)
  assert first.shape == (12, 8)
  np.testing.assert_array_equal(first, schedules.train_schedule(103, 8, seed=0, epoch=3))
  assert len(set(first.ravel())) == 96  # no example twice
  assert (first != schedules.train_schedule(103, 8, seed=0, epoch=4)).any()
  assert (first != schedules.train_schedule(103, 8, seed=1, epoch=3)).any()


def test_eval_schedule_covers_every_example_once():
  indices, valid = schedules.eval_schedule(10, 4)
  assert indices.shape == (3, 4)
  assert sorted(indices[valid]) == list(range(10))
  assert valid.sum() == 10 and not valid[-1, 2:].any()


def test_processes_get_disjoint_slices():
  columns = [schedules.process_columns(8, p, 4) for p in range(4)]
  covered = np.concatenate([np.arange(8)[c] for c in columns])
  np.testing.assert_array_equal(covered, np.arange(8))
  with pytest.raises(ValueError, match='not divisible'):
    schedules.process_columns(6, 0, 4)


# ---- the datasets, in both modes -------------------------------------------------


def test_batches_are_sharded_typed_and_sized(datasets):
  train = datasets['train']
  assert set(datasets) == {'train', 'validation', 'test'}
  assert sum(d.num_examples for d in datasets.values()) == 30
  assert train.steps_per_epoch == train.num_examples // 4
  assert datasets['validation'].steps_per_epoch == -(-datasets['validation'].num_examples // 4)
  batch = next(train.train_batches(0))
  assert batch['image'].shape == (4, 32, 48, 3) and batch['image'].dtype == jnp.float32
  assert batch['label'].shape == (4, 32, 48) and batch['label'].dtype == jnp.int32
  assert batch['valid'].dtype == jnp.bool_ and bool(batch['valid'].all())
  for value in batch.values():
    assert value.sharding.spec == jax.sharding.PartitionSpec('data')
  image = np.asarray(batch['image'])
  assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.05
  assert np.asarray(batch['label']).max() <= 22


def test_train_order_is_deterministic_and_resumes_exactly(datasets):
  train = datasets['train']
  epoch_1 = _numpy(train.train_batches(1))
  assert len(epoch_1) == train.steps_per_epoch
  again = _numpy(train.train_batches(1))
  for a, b in zip(epoch_1, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  resumed = _numpy(train.train_batches(1, first_step=2))
  assert len(resumed) == len(epoch_1) - 2
  for a, b in zip(epoch_1[2:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
  epoch_2 = _numpy(train.train_batches(2))
  assert any((a['image'] != b['image']).any() for a, b in zip(epoch_1, epoch_2))


def test_eval_batches_cover_every_example_once(datasets):
  split = datasets['validation']
  batches = _numpy(split.eval_batches())
  assert len(batches) == split.steps_per_epoch
  valid = np.concatenate([b['valid'] for b in batches])
  assert valid.sum() == split.num_examples and not valid[split.num_examples:].any()
  images = np.concatenate([b['image'] for b in batches])[valid]
  expected = np.stack([split.load_example(i)[0] for i in range(split.num_examples)]) / 255
  np.testing.assert_allclose(images, expected, atol=1e-6)  # in order, not augmented


def test_class_pixel_counts(datasets):
  split = datasets['train']
  counts = split.class_pixel_counts()
  assert counts.dtype == np.int64 and counts.shape == (23,)
  assert counts.sum() == split.num_examples * 32 * 48
  expected = sum(np.bincount(split.load_example(i)[1].ravel(), minlength=23)
                 for i in range(split.num_examples))
  np.testing.assert_array_equal(counts, expected)


@pytest.mark.parametrize('device_cache', ['always', 'never'])
def test_train_splits_trains_on_the_union_of_the_named_splits(scenes, mesh, device_cache):
  held_out = ip.create_datasets(_config(scenes, device_cache=device_cache), mesh)
  both = ip.create_datasets(_config(scenes, device_cache=device_cache,
                                    train_splits=('train', 'validation')), mesh)
  train, validation, union = held_out['train'], held_out['validation'], both['train']
  assert union.splits == ('train', 'validation') and train.splits == ('train',)
  assert union.num_examples == train.num_examples + validation.num_examples
  assert union.steps_per_epoch == union.num_examples // 4 > train.steps_per_epoch
  # The class weights and the rare-class sampler count the union's pixels.
  np.testing.assert_array_equal(union.class_pixel_counts(),
                                train.class_pixel_counts() + validation.class_pixel_counts())
  # Every frame of both splits is drawn in an epoch, nothing else.
  labels = lambda data: sorted(data.load_example(i)[1].tobytes() for i in range(data.num_examples))
  assert labels(union) == sorted(labels(train) + labels(validation))
  # The validation split itself is unchanged.
  assert both['validation'].num_examples == validation.num_examples


def test_named_validation_groups_reach_the_validation_split(scenes, mesh):
  named = (synthetic.scene_name(2), synthetic.scene_name(11), synthetic.scene_name(20))
  config = _config(scenes, validation_groups=named, validation_fraction=0.0, test_fraction=0.0)
  datasets = ip.create_datasets(config, mesh)
  validation = datasets['validation']
  assert validation.num_examples == 3 and datasets['train'].num_examples == 27
  # Exactly the named frames validate.
  expected = []
  for name in named:
    image = np.asarray(carla_files.read_image(scenes / 'CameraRGB' / f'{name}.png'))
    mask = np.asarray(carla_files.read_mask(scenes / 'CameraMask' / f'{name}.png'))
    expected.append(preprocessing.resize_pair(image, mask, (32, 48))[1].tobytes())
  got = [validation.load_example(i)[1].tobytes() for i in range(3)]
  assert sorted(got) == sorted(expected)


def test_excluded_frames_leave_every_split(scenes, mesh):
  names = [synthetic.scene_name(i) for i in range(30)]
  split = {n: carla_dataset.split_of(n, 'name', 0.25, 0.25) for n in names}
  excluded = (names[0], names[1], names[2])
  config = _config(scenes, exclude_frames=excluded)
  sizes = {name: data.num_examples for name, data in ip.create_datasets(config, mesh).items()}
  counts = collections.Counter(split[n] for n in names if n not in excluded)
  assert sizes == dict(counts) and sum(sizes.values()) == 27
  # A config saved before the field existed reads as none left out.
  old = _config(scenes)
  del old.data['exclude_frames']
  sizes = {name: data.num_examples for name, data in ip.create_datasets(old, mesh).items()}
  assert sizes == dict(collections.Counter(split.values()))


def test_excluded_groups_leave_every_split_but_not_an_evaluated_folder(scenes, mesh, tmp_path):
  names = [synthetic.scene_name(i) for i in range(30)]
  group = names[0][:3]
  config = _config(scenes, split_key='recording', validation_fraction=0.0, test_fraction=0.0,
                   validation_groups=(names[4][:3],), exclude_groups=(group,))
  sizes = {name: data.num_examples for name, data in ip.create_datasets(config, mesh).items()}
  per_group = synthetic.FRAMES_PER_RECORDING
  assert sizes == {'train': 30 - 2 * per_group, 'validation': per_group}
  # A folder given to evaluate is scored whole.
  data = ip.folder_dataset(config, mesh, scenes, prepared_dir=str(tmp_path))
  assert data.num_examples == 30 and names[0] in data.frame_names()


def test_excluded_frames_leave_an_evaluated_folder(scenes, mesh, tmp_path):
  # Names the folder holds are left out; one it does not hold is passed over.
  config = _config(scenes, exclude_frames=(synthetic.scene_name(4), '999999'))
  data = ip.folder_dataset(config, mesh, scenes, prepared_dir=str(tmp_path))
  assert data.num_examples == 29
  assert synthetic.scene_name(4) not in data.frame_names()


def test_both_modes_give_the_same_order_and_eval_data(scenes, mesh):
  cached = ip.create_datasets(_config(scenes, device_cache='always'), mesh)['train']
  streamed = ip.create_datasets(_config(scenes, device_cache='never'), mesh)['train']
  assert cached.device_cached and not streamed.device_cached
  for a, b in zip(_numpy(cached.train_batches(5)), _numpy(streamed.train_batches(5))):
    np.testing.assert_allclose(a['image'], b['image'], atol=1e-6)  # augmentation off
    np.testing.assert_array_equal(a['label'], b['label'])


def test_both_modes_augment_every_example_the_same_way(scenes, mesh):
  def augmented(device_cache):
    config = _config(scenes, device_cache=device_cache)
    config.data.augment.update(horizontal_flip=True, scale_range=(1.0, 1.5), brightness=0.2,
                               contrast=0.2, saturation=0.2)
    return ip.create_datasets(config, mesh)['train']

  cached, streamed = augmented('always'), augmented('never')
  plain = _numpy(ip.create_datasets(_config(scenes, device_cache='never'), mesh)['train']
                 .train_batches(3))
  for a, b, c in zip(_numpy(cached.train_batches(3)), _numpy(streamed.train_batches(3)), plain):
    np.testing.assert_allclose(a['image'], b['image'], atol=1e-5)
    np.testing.assert_array_equal(a['label'], b['label'])
    assert np.abs(a['image'] - c['image']).max() > 0.05  # augmented at all


def test_device_cache_makes_no_implicit_transfers(scenes, mesh):
  train = ip.create_datasets(_config(scenes, device_cache='always'), mesh)['train']
  next(train.train_batches(0))  # compile outside the guard
  with jax.transfer_guard('disallow'):
    batches = list(train.train_batches(1))
  assert len(batches) == train.steps_per_epoch


def test_host_batches_per_process_are_disjoint_and_complete(datasets):
  train = datasets['train']
  indices = schedules.train_schedule(train.num_examples, 4, seed=0, epoch=0)
  valid = np.ones(indices.shape, bool)
  whole = list(train.host_batches(indices, valid, process_index=0, process_count=1))
  halves = [list(train.host_batches(indices, valid, process_index=p, process_count=2))
            for p in range(2)]
  for step, batch in enumerate(whole):
    first, second = halves[0][step]['image'], halves[1][step]['image']
    assert first.shape[0] == second.shape[0] == 2
    np.testing.assert_array_equal(np.concatenate([first, second]), batch['image'])
    assert not np.array_equal(first, second)


def test_valid_padding_crops_labels(scenes, mesh):
  config = _config(scenes, device_cache='always', image_size=(36, 52))
  config.model.depth = 1
  config.model.padding = 'VALID'
  split = ip.create_datasets(config, mesh)['validation']
  assert split.label_size == (20, 36)
  batch = next(split.eval_batches())
  assert batch['label'].shape == (4, 20, 36)
  full_label = split.load_example(0)[1]
  np.testing.assert_array_equal(np.asarray(batch['label'][0]), full_label[8:28, 8:44])


def test_synthetic_scenes_are_written_when_the_folder_is_empty(tmp_path, mesh):
  config = _config(tmp_path / 'new', synthetic_scenes=12, device_cache='never',
                   validation_fraction=0.3, test_fraction=0.0)
  config.batch_size = 2
  datasets = ip.create_datasets(config, mesh)
  assert len(list((tmp_path / 'new' / 'CameraRGB').glob('*.png'))) == 12
  assert set(datasets) == {'train', 'validation'}
  assert sum(d.num_examples for d in datasets.values()) == 12


def test_batches_span_eight_devices(scenes):
  script = textwrap.dedent(f"""
      import jax, numpy as np
      from configs import carla
      from unet_jax import input_pipeline as ip
      assert len(jax.devices()) == 8
      mesh = jax.make_mesh((8,), ('data',))  # explicit axes: the pipeline takes either kind
      for mode in ('always', 'never'):
        config = carla.get_config()
        config.data.data_dir = {str(scenes)!r}
        config.data.prepared_dir = {str(scenes / 'prepared8')!r}
        config.data.image_size = (32, 48)
        config.data.split_key = 'name'
        config.data.device_cache = mode
        config.data.augment.horizontal_flip = True
        config.model.depth = 2
        config.batch_size = 8
        data = ip.create_datasets(config, mesh)
        batch = next(data['train'].train_batches(0))
        for value in batch.values():
          assert len(value.sharding.device_set) == 8, value.sharding
          assert value.sharding.spec == jax.sharding.PartitionSpec('data')
          assert len(value.addressable_shards) == 8
          assert value.addressable_shards[0].data.shape[0] == 1
        evaluation = list(data['validation'].eval_batches())
        valid = np.concatenate([np.asarray(b['valid']) for b in evaluation])
        assert valid.sum() == data['validation'].num_examples
      print('ok')
  """)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                          text=True, timeout=300, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('ok')


# ---- training crops ----------------------------------------------------------------


@pytest.mark.parametrize('xp', [np, jnp], ids=['numpy', 'jax'])
def test_crop_with_scale_jitter_has_the_crop_size_and_unblended_labels(xp):
  image, label = _label_coded_example()
  crop = augmentation.Augment(horizontal_flip=True, scale_range=(0.7, 1.6), crop_size=(16, 24))
  for seed in range(6):
    uniforms = np.random.default_rng(seed).random(augmentation.NUM_AUGMENT_UNIFORMS).astype(np.float32)
    out_image, out_label = map(np.asarray, augmentation.augment_example(
        xp, xp.asarray(image), xp.asarray(label), xp.asarray(uniforms), crop))
    assert out_image.shape == (16, 24, 3) and out_label.shape == (16, 24)
    assert set(np.unique(out_label)) <= set(np.unique(label))  # nearest: no new labels
    inside = _interior(out_label)
    decoded = np.round(out_image[..., 0] * 255 / 10)
    np.testing.assert_array_equal(decoded[inside], out_label[inside])


def test_crop_at_scale_one_is_a_window_of_the_frame():
  image, label = _label_coded_example()
  crop = augmentation.Augment(crop_size=(16, 24))
  uniforms = np.zeros(augmentation.NUM_AUGMENT_UNIFORMS, np.float32)  # top left
  out_image, out_label = augmentation.augment_example(np, image, label, uniforms, crop)
  np.testing.assert_array_equal(out_label, label[:16, :24])
  np.testing.assert_allclose(out_image, image[:16, :24], atol=1e-6)
  uniforms[2:4] = 1.0  # bottom right
  _, out_label = augmentation.augment_example(np, image, label, uniforms, crop)
  np.testing.assert_array_equal(out_label, label[-16:, -24:])


def test_both_modes_draw_the_same_crops_and_evaluate_whole_frames(scenes, mesh):
  def cropped(device_cache):
    config = _config(scenes, device_cache=device_cache, train_crop_size=(16, 24))
    config.data.augment.update(horizontal_flip=True, scale_range=(0.8, 1.5), brightness=0.1,
                               rare_windows=0.5)
    return ip.create_datasets(config, mesh)

  cached, streamed = cropped('always'), cropped('never')
  assert cached['train'].device_cached and not streamed['train'].device_cached
  epochs = [_numpy(d['train'].train_batches(2)) for d in (cached, streamed)]
  for a, b in zip(*epochs):
    assert a['image'].shape == (4, 16, 24, 3) and a['label'].shape == (4, 16, 24)
    np.testing.assert_allclose(a['image'], b['image'], atol=1e-5)
    np.testing.assert_array_equal(a['label'], b['label'])
  resumed = _numpy(streamed['train'].train_batches(2, first_step=1))
  np.testing.assert_array_equal(resumed[0]['label'], epochs[0][1]['label'])
  for data in (cached, streamed):
    batch = next(data['validation'].eval_batches())
    assert batch['image'].shape == (4, 32, 48, 3) and batch['label'].shape == (4, 32, 48)


# ---- rare-class windows -------------------------------------------------------------

POLE, SIGN = 5, 12  # classes.CLASS_NAMES ids


def _windows(xp, label, augment, draws, seed=0):
  """Labels of `draws` augmentations of a blank image with `label`, and their uniforms."""
  image = np.zeros(label.shape + (3,), np.float32)
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(draws):
    uniforms = rng.random(augmentation.NUM_AUGMENT_UNIFORMS).astype(np.float32)
    _, crop = augmentation.augment_example(xp, xp.asarray(image), xp.asarray(label),
                                           xp.asarray(uniforms), augment)
    out.append((np.asarray(crop), uniforms))
  return out


@pytest.mark.parametrize('xp', [np, jnp], ids=['numpy', 'jax'])
def test_rare_windows_hold_the_rare_pixel_and_otherwise_change_nothing(xp):
  label = np.zeros((40, 60), np.uint8)
  label[33, 4] = POLE  # one pixel near the bottom-left corner
  crop = dict(horizontal_flip=True, scale_range=(1.0, 2.0), crop_size=(16, 24))
  placed = augmentation.Augment(**crop, rare_windows=0.4, rare_classes=(POLE, SIGN))
  plain = augmentation.Augment(**crop)
  windows = _windows(xp, label, placed, 60)
  placed_draws = 0
  for (out, uniforms), (reference, _) in zip(windows, _windows(xp, label, plain, 60)):
    if uniforms[7] < 0.4:  # this draw's window goes over the pole pixel
      placed_draws += 1
      assert (out == POLE).any()
    else:
      np.testing.assert_array_equal(out, reference)
  assert 10 < placed_draws < 50
  # Without the lever most windows of this frame miss the pixel.
  assert sum((out == POLE).any() for out, _ in _windows(xp, label, plain, 60)) < 20


def test_rare_windows_choose_each_present_class_equally():
  label = np.zeros((48, 64), np.uint8)
  label[:20, :20] = POLE  # 400 pixels top left
  label[45, 60] = SIGN    # one pixel bottom right; no 12x16 window holds both
  augment = augmentation.Augment(crop_size=(12, 16), rare_windows=1.0,
                                 rare_classes=(4, POLE, SIGN, 18))  # 4 and 18 absent
  windows = [out for out, _ in _windows(np, label, augment, 400, seed=1)]
  with_sign = np.mean([(out == SIGN).any() for out in windows])
  with_pole = np.mean([(out == POLE).any() for out in windows])
  assert 0.42 < with_sign < 0.58 and 0.42 < with_pole < 0.58
  assert with_sign + with_pole == pytest.approx(1.0)
  # A frame without rare pixels is cropped as without the lever.
  empty = np.zeros_like(label)
  plain = augmentation.Augment(crop_size=(12, 16))
  for (a, _), (b, _) in zip(_windows(np, empty + 3, augment, 20), _windows(np, empty + 3, plain, 20)):
    np.testing.assert_array_equal(a, b)


def test_rare_window_columns_leave_the_earlier_draws_as_they_were():
  # Runs measured before the window columns existed keep their augmentation.
  uniforms = augmentation.epoch_uniforms(50, seed=3, epoch=2)
  assert uniforms.shape == (50, augmentation.NUM_AUGMENT_UNIFORMS)
  np.testing.assert_array_equal(
      uniforms[:, :7], np.random.default_rng([3, 2, 1]).random((50, 7), dtype=np.float32))
  assert not np.array_equal(uniforms[:, 7:], uniforms[:, :3])


# ---- rare-class sampling ------------------------------------------------------------


def test_rare_frame_weights_by_hand():
  # Pixels of two rare classes in three frames; class means 2 and 10/3.
  counts = np.array([[0, 0], [2, 10], [4, 0]])
  # Rare content: frame 0 none; frame 1 (2/2 + 10/(10/3)) / 2 = 2; frame 2 (4/2 + 0) / 2 = 1.
  np.testing.assert_allclose(schedules.rare_frame_weights(counts, [0, 1], boost=2.0), [1, 5, 3])
  # A rare class absent from the split is left out of the mean.
  counts = np.array([[0, 0, 1], [2, 0, 3]])
  np.testing.assert_allclose(schedules.rare_frame_weights(counts, [0, 1], boost=1.0), [1, 3])
  np.testing.assert_allclose(schedules.rare_frame_weights(counts, [1], boost=1.0), [1, 1])


def test_weighted_schedule_draws_frames_in_proportion_to_their_weights():
  weights = np.array([1.0] * 5 + [3.0] * 5)
  draws = np.concatenate([schedules.train_schedule(10, 5, seed=0, epoch=e, weights=weights).ravel()
                          for e in range(3000)])
  frequency = np.bincount(draws, minlength=10) / len(draws)
  # Expected 1/20 and 3/20; 30,000 draws give a standard error of about 0.002.
  np.testing.assert_allclose(frequency, weights / weights.sum(), atol=0.01)
  np.testing.assert_array_equal(schedules.train_schedule(10, 5, 0, 7, weights),
                                schedules.train_schedule(10, 5, 0, 7, weights))
  assert (schedules.train_schedule(10, 5, 0, 7, weights) != schedules.train_schedule(10, 5, 0, 8, weights)).any()


def test_rare_boost_weights_the_split_by_its_own_frame_counts(scenes, mesh):
  config = _config(scenes, device_cache='never', rare_boost=4.0,
                   rare_classes=('Pedestrian', 'Vehicles'))
  train = ip.create_datasets(config, mesh)['train']
  counts = train.frame_class_counts()
  assert counts.shape == (train.num_examples, 23)
  np.testing.assert_array_equal(counts.sum(axis=0), train.class_pixel_counts())
  weights = train.sampling_weights()
  np.testing.assert_allclose(weights, schedules.rare_frame_weights(counts, [4, 10], 4.0))
  assert weights.max() > weights.min()
  drawn = schedules.train_schedule(train.num_examples, 4, 0, 3, weights)
  first = np.asarray(next(train.train_batches(3))['label'])
  for row, index in enumerate(drawn[0]):
    np.testing.assert_array_equal(first[row], train.load_example(index)[1])


# ---- copy-paste ---------------------------------------------------------------------


@pytest.mark.parametrize('xp', [np, jnp], ids=['numpy', 'jax'])
def test_paste_objects_by_hand(xp):
  label = np.array([[0, 1, 1], [2, 2, 0]], np.uint8)
  image = np.zeros((2, 3, 3), np.float32)
  donor_label = np.array([[4, 7, 5], [0, 4, 4]], np.uint8)  # classes 4 and 5 are pasted
  donor_image = np.arange(18, dtype=np.float32).reshape(2, 3, 3) / 18
  paste = lambda mirrored, pasted=True: tuple(map(np.asarray, augmentation.paste_objects(
      xp, xp.asarray(image), xp.asarray(label), xp.asarray(donor_image), xp.asarray(donor_label),
      (4, 5), xp.asarray(mirrored), xp.asarray(pasted))))
  out_image, out_label = paste(False)
  np.testing.assert_array_equal(out_label, [[4, 1, 5], [2, 4, 4]])
  taken = np.array([[1, 0, 1], [0, 1, 1]], bool)
  np.testing.assert_array_equal(out_image[taken], donor_image[taken])
  np.testing.assert_array_equal(out_image[~taken], 0)
  assert out_image.dtype == np.float32 and out_label.dtype == np.uint8
  # Mirrored: the donor's rows read right to left, [5, 7, 4] and [4, 4, 0].
  out_image, out_label = paste(True)
  np.testing.assert_array_equal(out_label, [[5, 1, 4], [4, 4, 0]])
  np.testing.assert_array_equal(out_image[0, 0], donor_image[0, 2])
  np.testing.assert_array_equal(out_image[1, 1], donor_image[1, 1])
  # Not pasted: the example unchanged.
  out_image, out_label = paste(True, pasted=False)
  np.testing.assert_array_equal(out_label, label)
  np.testing.assert_array_equal(out_image, image)


def test_rare_content_by_hand():
  counts = np.array([[0, 0], [2, 10], [4, 0]])  # class means 2 and 10/3
  np.testing.assert_allclose(schedules.rare_content(counts, [0, 1]), [0, 2, 1])
  np.testing.assert_allclose(schedules.rare_content(counts[:, :1] * 0, [0]), [0, 0, 0])


def test_paste_donors_follow_rare_content_and_the_probability():
  content = np.array([0.0, 1.0, 3.0, 0.0])
  donors = np.concatenate([schedules.paste_donors(content, 50, 0.4, seed=0, epoch=e)
                           for e in range(400)])
  assert donors.shape == (20000, 2) and donors.dtype == np.int32
  pasted = donors[:, 0] >= 0
  # 20,000 slots: standard errors about 0.004 on each share.
  assert abs(pasted.mean() - 0.4) < 0.02
  frequency = np.bincount(donors[pasted, 0], minlength=4) / pasted.sum()
  np.testing.assert_allclose(frequency, [0, 0.25, 0.75, 0], atol=0.02)
  assert abs(donors[:, 1].mean() - 0.5) < 0.02 and set(np.unique(donors[:, 1])) == {0, 1}
  np.testing.assert_array_equal(schedules.paste_donors(content, 50, 0.4, 0, 7),
                                schedules.paste_donors(content, 50, 0.4, 0, 7))
  assert (schedules.paste_donors(content, 50, 0.4, 0, 7) !=
          schedules.paste_donors(content, 50, 0.4, 0, 8)).any()
  # A split without rare pixels has no donor.
  assert (schedules.paste_donors(np.zeros(4), 50, 1.0, 0, 0)[:, 0] == -1).all()


def test_both_modes_paste_the_drawn_donors_objects(scenes, mesh):
  def pasting(device_cache):
    config = _config(scenes, device_cache=device_cache, rare_classes=('Pedestrian', 'Vehicles'))
    config.data.augment.copy_paste = 0.75
    return ip.create_datasets(config, mesh)['train']

  cached, streamed = pasting('always'), pasting('never')
  assert cached.device_cached and not streamed.device_cached
  content = streamed.donor_content()
  np.testing.assert_allclose(content, schedules.rare_content(streamed.frame_class_counts(), [4, 10]))
  epoch = 2
  order = schedules.train_schedule(streamed.num_examples, 4, 0, epoch)
  donors = schedules.paste_donors(content, order.size, 0.75, 0, epoch).reshape(*order.shape, 2)
  assert (donors[..., 0] >= 0).any() and (donors[..., 0] < 0).any()
  changed = 0
  for step, (a, b) in enumerate(zip(_numpy(cached.train_batches(epoch)),
                                    _numpy(streamed.train_batches(epoch)))):
    np.testing.assert_allclose(a['image'], b['image'], atol=1e-6)
    np.testing.assert_array_equal(a['label'], b['label'])
    for column, index in enumerate(order[step]):
      image, label = streamed.load_example(index)
      donor, mirrored = donors[step, column]
      if donor >= 0:
        donor_image, donor_label = streamed.load_example(donor)
        if mirrored:
          donor_image, donor_label = donor_image[:, ::-1], donor_label[:, ::-1]
        pasted = np.isin(donor_label, [4, 10])
        image = np.where(pasted[..., None], donor_image, image)
        label = np.where(pasted, donor_label, label)
        changed += int((label != streamed.load_example(index)[1]).any())
      np.testing.assert_array_equal(b['label'][column], label)
      np.testing.assert_allclose(b['image'][column], image / 255.0, atol=1e-6)
  assert changed > 0
  # Evaluation is never pasted.
  first = _numpy(streamed.eval_batches())[0]
  np.testing.assert_array_equal(first['label'][0], streamed.load_example(0)[1])


def test_synthetic_scenes_written_at_once_are_one_whole_set(tmp_path):
  """Runs started side by side on a fresh machine: each writes a whole set
  and only the first to finish lands; the others use it."""
  data = tmp_path / 'data' / 'synthetic'
  start = threading.Barrier(3)

  def write(seed):
    start.wait()
    ip.write_synthetic_scenes(data, 6, seed)

  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    list(pool.map(write, range(3)))
  written = {f.name: f.read_bytes() for f in sorted((data / 'CameraRGB').iterdir())}
  assert len(written) == 6 and len(list((data / 'CameraMask').iterdir())) == 6
  references = []
  for seed in range(3):
    synthetic.write_scenes(tmp_path / f'seed{seed}', 6, seed=seed, size=(480, 640))
    references.append({f.name: f.read_bytes()
                       for f in sorted((tmp_path / f'seed{seed}' / 'CameraRGB').iterdir())})
  assert written in references  # one seed's whole set, not a mixture
  assert sorted(p.name for p in data.parent.iterdir()) == ['synthetic']  # no partial folders


def test_interrupted_synthetic_scenes_leave_no_partial_set(tmp_path, monkeypatch):
  data = tmp_path / 'synthetic'
  data.mkdir()  # an empty folder is filled like a missing one
  write_one = synthetic._write_one
  calls = []

  def fail_on_the_fourth(*args):
    calls.append(args)
    if len(calls) == 4:
      raise KeyboardInterrupt
    return write_one(*args)

  monkeypatch.setattr(synthetic, '_write_one', fail_on_the_fourth)
  monkeypatch.setattr(synthetic.os, 'cpu_count', lambda: 1)  # scenes one after another
  with pytest.raises(KeyboardInterrupt):
    ip.write_synthetic_scenes(data, 8, seed=0)
  assert not ip._has_frames(data)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['synthetic']
  monkeypatch.setattr(synthetic, '_write_one', write_one)
  ip.write_synthetic_scenes(data, 8, seed=0)
  assert len(list((data / 'CameraRGB').glob('*.png'))) == 8


def test_synthetic_scenes_refuse_a_folder_holding_other_files(tmp_path):
  (tmp_path / 'notes.txt').write_text('mine')
  with pytest.raises(errors.UserError, match='holds no frames in CameraRGB/ but is not empty'):
    ip.write_synthetic_scenes(tmp_path, 4, seed=0)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['notes.txt']
