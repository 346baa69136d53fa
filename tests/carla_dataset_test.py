"""The tensorflow-datasets builder: splits, features, metadata, re-preparation."""

import collections
import importlib
import json
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from unet_jax import carla_dataset
from unet_jax import carla_files
from unet_jax import classes
from unet_jax import synthetic


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
  root = tmp_path_factory.mktemp('scenes')
  synthetic.write_scenes(root, 40, seed=0, size=(32, 48))
  return root


def test_split_is_a_pure_function_of_the_group_key():
  assert carla_dataset.group_key('002128', 'recording') == '002'
  assert carla_dataset.group_key('002128', 'name') == '002128'
  # All frames of a recording land together.
  splits = {carla_dataset.split_of(f'017{i:03d}', 'recording', 0.3, 0.3) for i in range(50)}
  assert len(splits) == 1
  # Fractions are honoured over many groups.
  counts = collections.Counter(carla_dataset.split_of(f'{i:06d}', 'name', 0.15, 0.15)
                               for i in range(20000))
  assert abs(counts['validation'] / 20000 - 0.15) < 0.01
  assert abs(counts['test'] / 20000 - 0.15) < 0.01


def test_named_validation_groups_replace_the_validation_fraction():
  names = [f'{block:03d}{frame:03d}' for block in range(40) for frame in range(3)]
  named = ('004', '017')
  splits = carla_dataset.assign_splits(names, 'recording', 0.5, 0.2, named)
  assert sorted(splits['validation']) == [n for n in names if n[:3] in named]
  # The other recordings train or test exactly as the hash sends them with no
  # validation fraction: naming groups moves no frame between train and test.
  for name in splits['train'] + splits['test']:
    assert name in splits[carla_dataset.split_of(name, 'recording', 0.0, 0.2)]
  assert splits['test'] and splits['train']
  # A named group the data does not hold is an error that names it.
  with pytest.raises(carla_dataset.SplitError, match=r"'099'.*the data holds 40"):
    carla_dataset.assign_splits(names, 'recording', 0.5, 0.0, ('004', '099'))
  # Naming every group leaves training empty: an error, with the remedy.
  everything = tuple(f'{block:03d}' for block in range(40))
  with pytest.raises(carla_dataset.SplitError,
                     match='train would be empty.*validation_groups names 40 of them.*fewer'):
    carla_dataset.assign_splits(names, 'recording', 0.5, 0.0, everything)


def test_prepared_copy_with_named_validation_groups(scenes, tmp_path):
  hashed = carla_dataset.prepare(scenes, prepared_dir=str(tmp_path), split_key='name',
                                 validation_fraction=0.3, test_fraction=0.0)
  named = (synthetic.scene_name(3), synthetic.scene_name(7))
  builder = carla_dataset.prepare(scenes, prepared_dir=str(tmp_path), split_key='name',
                                  validation_fraction=0.3, test_fraction=0.0,
                                  validation_groups=named)
  assert builder.data_dir != hashed.data_dir  # its own prepared copy
  validation = sorted(e['file_name'].decode()
                      for e in carla_dataset.data_source(builder, 'validation'))
  assert validation == sorted(named)
  assert carla_dataset.split_sizes(builder) == {'train': 38, 'validation': 2}


def test_builder_splits_features_and_metadata(scenes, tmp_path):
  builder = carla_dataset.prepare(scenes, prepared_dir=str(tmp_path), split_key='name')
  sizes = carla_dataset.split_sizes(builder)
  expected = collections.Counter(carla_dataset.split_of(synthetic.scene_name(i), 'name', 0.15, 0.15)
                                 for i in range(40))
  assert sizes == dict(expected) and sum(sizes.values()) == 40
  assert carla_dataset.class_names(builder) == list(classes.CLASS_NAMES)
  source = carla_dataset.data_source(builder, 'train')
  example = source[0]
  assert example['image'].shape == (32, 48, 3) and example['image'].dtype == np.uint8
  assert example['segmentation_mask'].shape == (32, 48, 1)
  name = example['file_name'].decode()
  # Pixels survive the round trip exactly (PNG is lossless).
  image = carla_files.read_image(scenes / 'CameraRGB' / f'{name}.png')
  mask = carla_files.read_mask(scenes / 'CameraMask' / f'{name}.png')
  np.testing.assert_array_equal(example['image'], image)
  np.testing.assert_array_equal(example['segmentation_mask'][..., 0], mask)
  assert 'tensorflow' not in sys.modules


def test_recording_split_keeps_recordings_together(scenes, tmp_path):
  builder = carla_dataset.prepare(scenes, prepared_dir=str(tmp_path), split_key='recording',
                                  validation_fraction=0.3, test_fraction=0.2)
  recordings = {}
  for split in carla_dataset.split_sizes(builder):
    names = [e['file_name'].decode() for e in carla_dataset.data_source(builder, split)]
    recordings[split] = {n[:3] for n in names}
  assert not recordings['train'] & recordings['validation']
  assert not recordings['train'] & recordings['test']
  assert not recordings['validation'] & recordings['test']


def test_adding_frames_never_moves_existing_ones(tmp_path, monkeypatch):
  monkeypatch.setenv('UNET_JAX_CACHE', str(tmp_path / 'cache'))
  data = tmp_path / 'data'
  synthetic.write_scenes(data, 24, seed=0, size=(32, 48))

  def membership(builder):
    return {e['file_name'].decode(): split for split in carla_dataset.split_sizes(builder)
            for e in carla_dataset.data_source(builder, split)}

  settings = dict(split_key='name', validation_fraction=0.3, test_fraction=0.3)
  before = membership(carla_dataset.prepare(data, **settings))
  synthetic.write_scenes(tmp_path / 'more', 40, seed=0, size=(32, 48))
  for sub in ('CameraRGB', 'CameraMask'):
    for path in sorted((tmp_path / 'more' / sub).iterdir())[24:]:
      shutil.copy(path, data / sub / path.name)
  after = membership(carla_dataset.prepare(data, **settings))  # re-prepared: content changed
  assert len(after) == 40
  assert {name: after[name] for name in before} == before
  # The copy of the old content is gone; exactly one prepared copy remains, in
  # the cache, and nothing was written into the data folder.
  assert len(list((tmp_path / 'cache' / 'prepared' / 'carla_scenes').iterdir())) == 1
  assert sorted(p.name for p in data.iterdir()) == ['CameraMask', 'CameraRGB']


def test_changed_split_settings_prepare_a_new_copy(scenes, tmp_path):
  first = carla_dataset.prepare(scenes, prepared_dir=str(tmp_path), split_key='name')
  second = carla_dataset.prepare(scenes, prepared_dir=str(tmp_path), split_key='name',
                                 validation_fraction=0.3)
  assert first.data_dir != second.data_dir
  assert (carla_dataset.split_sizes(second)['validation'] >
          carla_dataset.split_sizes(first)['validation'])


def _membership(builder) -> dict[str, str]:
  return {e['file_name'].decode(): split for split in carla_dataset.split_sizes(builder)
          for e in carla_dataset.data_source(builder, split)}


def test_excluded_frames_are_in_no_split_and_the_others_keep_theirs(scenes, tmp_path):
  settings = dict(prepared_dir=str(tmp_path), split_key='name', validation_fraction=0.3,
                  test_fraction=0.2)
  everything = carla_dataset.prepare(scenes, **settings)
  before = _membership(everything)
  # One frame of each split.
  excluded = tuple(next(n for n in sorted(before) if before[n] == split)
                   for split in ('train', 'validation', 'test'))
  builder = carla_dataset.prepare(scenes, exclude_frames=excluded, **settings)
  assert builder.data_dir != everything.data_dir  # its own prepared copy
  after = _membership(builder)
  assert len(after) == 37 and not set(excluded) & set(after)
  assert after == {name: split for name, split in before.items() if name not in excluded}
  # An empty list is the copy without exclusions, not a new one.
  again = carla_dataset.prepare(scenes, exclude_frames=(), **settings)
  assert again.data_dir == everything.data_dir


def test_builder_config_name_carries_the_excluded_frames(scenes):
  plain = carla_dataset.builder_config(scenes, split_key='name').name
  assert carla_dataset.builder_config(scenes, split_key='name', exclude_frames=()).name == plain
  one = carla_dataset.builder_config(scenes, split_key='name', exclude_frames=('000001',)).name
  two = carla_dataset.builder_config(scenes, split_key='name',
                                     exclude_frames=('000002', '000001')).name
  assert '-x1x' in one and '-x2x' in two and len({plain, one, two}) == 3
  # The list's order does not matter; its content does.
  assert carla_dataset.builder_config(scenes, split_key='name',
                                      exclude_frames=('000001', '000002')).name == two
  # Folder and content stay last: stale copies are told apart by them.
  assert one.split('-')[-2:] == plain.split('-')[-2:]


def test_excluded_name_that_is_not_a_frame_is_an_error(scenes, tmp_path):
  with pytest.raises(carla_dataset.SplitError,
                     match=f"data.exclude_frames names '000999', which is not a frame of {scenes}"):
    carla_dataset.prepare(scenes, prepared_dir=str(tmp_path), split_key='name',
                          exclude_frames=(synthetic.scene_name(0), '000999'))
  assert not list(tmp_path.glob('**/dataset_info.json'))


def test_excluded_groups_leave_all_their_frames_and_share_the_listed_copy(scenes, tmp_path):
  settings = dict(prepared_dir=str(tmp_path), split_key='recording', validation_fraction=0.0,
                  test_fraction=0.0, validation_groups=('003', '007'))
  before = _membership(carla_dataset.prepare(scenes, **settings))
  assert len(before) == 40
  builder = carla_dataset.prepare(scenes, exclude_groups=('001', '005'), **settings)
  after = _membership(builder)
  gone = {n for n in before if n[:3] in ('001', '005')}
  assert len(gone) == 2 * synthetic.FRAMES_PER_RECORDING
  assert after == {n: split for n, split in before.items() if n not in gone}
  assert collections.Counter(after.values())['validation'] == 2 * synthetic.FRAMES_PER_RECORDING
  # The same frames listed one by one give the same prepared copy.
  listed = carla_dataset.prepare(scenes, exclude_frames=tuple(sorted(gone)), **settings)
  assert listed.data_dir == builder.data_dir
  # A frame both listed and in an excluded group counts once.
  both = carla_dataset.prepare(scenes, exclude_frames=(min(gone),), exclude_groups=('001', '005'),
                               **settings)
  assert both.data_dir == builder.data_dir


def test_excluded_group_that_is_absent_or_validates_is_an_error(scenes, tmp_path):
  with pytest.raises(carla_dataset.SplitError,
                     match=r"data.exclude_groups names '042', but no frame has that recording key"):
    carla_dataset.prepare(scenes, prepared_dir=str(tmp_path), exclude_groups=('001', '042'))
  with pytest.raises(carla_dataset.SplitError,
                     match=r"exclude_groups and data.validation_groups both name '003'"):
    carla_dataset.prepare(scenes, prepared_dir=str(tmp_path), validation_groups=('003', '004'),
                          exclude_groups=('003',))
  assert not list(tmp_path.glob('**/dataset_info.json'))


def test_excluding_a_whole_split_is_the_empty_split_error(scenes, tmp_path):
  names = [synthetic.scene_name(i) for i in range(40)]
  validation = tuple(n for n in names
                     if carla_dataset.split_of(n, 'name', 0.3, 0.0) == 'validation')
  assert validation
  with pytest.raises(carla_dataset.SplitError,
                     match=r'validation would be empty.*exclude_frames / exclude_groups leave out '
                           f'{len(validation)} frame'):
    carla_dataset.prepare(scenes, prepared_dir=str(tmp_path), split_key='name',
                          validation_fraction=0.3, test_fraction=0.0, exclude_frames=validation)


def test_folders_sharing_a_prepared_dir_keep_their_copies(tmp_path):
  for name in ('a', 'b'):
    synthetic.write_scenes(tmp_path / name, 12, seed=len(name), size=(32, 48))
  settings = dict(prepared_dir=str(tmp_path / 'shared'), split_key='name',
                  validation_fraction=0.3, test_fraction=0.0)
  first = carla_dataset.prepare(tmp_path / 'a', **settings)
  carla_dataset.prepare(tmp_path / 'b', **settings)
  assert len(list((tmp_path / 'shared' / 'carla_scenes').iterdir())) == 2
  assert sum(carla_dataset.split_sizes(first).values()) == 12


def test_empty_split_suggests_splitting_by_name(tmp_path):
  synthetic.write_scenes(tmp_path, 4, seed=0, size=(32, 48))  # one recording only
  with pytest.raises(ValueError, match="split_key='name'"):
    carla_dataset.prepare(tmp_path, split_key='recording')


def test_bad_pair_fails_before_anything_is_prepared(tmp_path, monkeypatch):
  monkeypatch.setenv('UNET_JAX_CACHE', str(tmp_path / '.prepared'))
  synthetic.write_scenes(tmp_path, 16, seed=0, size=(32, 48))
  (tmp_path / 'CameraMask' / '000002.png').unlink()
  with pytest.raises(carla_files.BadDataError, match='CameraRGB/000002.png'):
    carla_dataset.prepare(tmp_path, split_key='name', validation_fraction=0.3, test_fraction=0.3)
  assert not list((tmp_path / '.prepared').glob('**/dataset_info.json'))
  with pytest.warns(UserWarning, match='000002.png'):
    builder = carla_dataset.prepare(tmp_path, split_key='name', skip_bad_pairs=True,
                                    validation_fraction=0.3, test_fraction=0.3)
  assert sum(carla_dataset.split_sizes(builder).values()) == 15


def test_real_pairs_class_shares_match_readme(shared_carla_dir, tmp_path):
  # With test_fraction=0 every frame lands in train or validation.
  builder = carla_dataset.prepare(shared_carla_dir, prepared_dir=str(tmp_path),
                                  validation_fraction=0.3, test_fraction=0.0)
  assert set(carla_dataset.split_sizes(builder)) == {'train', 'validation'}
  counts = np.zeros(classes.NUM_CLASSES, np.int64)
  total = 0
  for split in carla_dataset.split_sizes(builder):
    source = carla_dataset.mask_source(builder, split)
    total += len(source)
    counts += carla_files.class_pixel_counts(
        source[i]['segmentation_mask'] for i in range(len(source)))
  assert total == 490
  shares = 100 * counts / counts.sum()
  readme = {'Road': 44.20, 'Sky': 33.14, 'Vegetation': 7.15, 'Building': 5.36, 'Terrain': 3.07,
            'SideWalk': 1.61, 'Wall': 1.35, 'GuardRail': 1.20, 'RoadLine': 1.02, 'Vehicles': 0.66}
  for name, share in readme.items():
    assert abs(shares[classes.CLASS_NAMES.index(name)] - share) < 0.05, name
  assert counts[0] == 0


def test_carla_config_split_of_the_real_frames(shared_carla_dir):
  # configs/carla.py's fractions on ../shared/carla: at least a third of the
  # frames, in whole recordings, validate (the README names them).
  config = importlib.import_module('configs.carla').get_config()
  data = config.data
  names = sorted(p.stem for p in (shared_carla_dir / 'CameraRGB').glob('*.png'))
  splits = carla_dataset.assign_splits(names, data.split_key, data.validation_fraction,
                                       data.test_fraction)
  recordings = {split: sorted({n[:3] for n in members}) for split, members in splits.items()}
  assert recordings == {
      'train': ['002', '004', '006', '011', '013', '017', '022'],
      'validation': ['000', '001', '007', '009', '018', '035', '064'],
  }
  assert {split: len(members) for split, members in splits.items()} == {'train': 315,
                                                                       'validation': 175}
  assert len(splits['validation']) >= len(names) / 3

def test_named_split_of_the_real_frames_puts_pedestrians_in_both(shared_carla_dir):
  # The split carla.py's comment and the README give: recording 009 trains,
  # 006 validates; at least a third of the frames still validate.
  named = ('000', '001', '006', '007', '018', '035', '064')
  names = sorted(p.stem for p in (shared_carla_dir / 'CameraRGB').glob('*.png'))
  splits = carla_dataset.assign_splits(names, 'recording', 0.5, 0.0, named)
  recordings = {split: sorted({n[:3] for n in members}) for split, members in splits.items()}
  assert recordings == {'train': ['002', '004', '009', '011', '013', '017', '022'],
                        'validation': list(named)}
  assert {split: len(m) for split, m in splits.items()} == {'train': 311, 'validation': 179}
  assert len(splits['validation']) >= len(names) / 3
  pedestrian = classes.CLASS_NAMES.index('Pedestrian')
  pixels = {split: sum(int((carla_files.read_mask(
                shared_carla_dir / 'CameraMask' / f'{n}.png') == pedestrian).sum())
                for n in members if n[:3] in ('001', '009'))
            for split, members in splits.items()}
  assert pixels['train'] > 10_000 and pixels['validation'] > 10_000


def test_prepared_copies_go_to_the_xdg_cache_never_into_the_data_folder(tmp_path, monkeypatch):
  monkeypatch.delenv('UNET_JAX_CACHE', raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  data = tmp_path / 'data'
  synthetic.write_scenes(data, 16, seed=0, size=(32, 48))
  before = sorted(str(p) for p in data.rglob('*'))
  data.chmod(0o555)  # as a shared read-only mount (root still could write; the listing checks)
  try:
    builder = carla_dataset.prepare(data, split_key='name', validation_fraction=0.3,
                                    test_fraction=0.0)
  finally:
    data.chmod(0o755)
  assert pathlib.Path(builder.data_dir).is_relative_to(tmp_path / 'xdg' / 'unet_jax')
  assert sorted(str(p) for p in data.rglob('*')) == before


_PREPARE_WHEN_TOLD = """
import json, pathlib, sys, time
from unet_jax import carla_dataset
data, prepared, ready, go = sys.argv[1:]
pathlib.Path(ready).touch()
while not pathlib.Path(go).exists():
  time.sleep(0.01)
builder = carla_dataset.prepare(data, prepared_dir=prepared, split_key='name',
                                validation_fraction=0.3, test_fraction=0.0)
print(json.dumps([str(builder.data_dir), carla_dataset.split_sizes(builder)]))
"""


def test_processes_preparing_at_once_share_one_copy(tmp_path):
  """Runs started side by side on a fresh cache (compare_recipes --parallel)
  all prepare the same copy: none may fail on another's half-made folder."""
  synthetic.write_scenes(tmp_path / 'data', 24, seed=0, size=(32, 48))
  go = tmp_path / 'go'
  children = []
  for k in range(3):
    ready = tmp_path / f'ready{k}'
    children.append((ready, subprocess.Popen(
        [sys.executable, '-c', _PREPARE_WHEN_TOLD, str(tmp_path / 'data'),
         str(tmp_path / 'prepared'), str(ready), str(go)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=pathlib.Path(__file__).resolve().parents[1])))
  deadline = time.monotonic() + 120
  while not all(ready.exists() for ready, _ in children) and time.monotonic() < deadline:
    time.sleep(0.05)
  go.touch()  # every child has imported tfds: they start preparing together
  outputs = []
  for _, child in children:
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-2000:]
    outputs.append(out.strip().splitlines()[-1])
  assert len(set(outputs)) == 1, outputs
  data_dir, sizes = json.loads(outputs[0])
  assert sum(sizes.values()) == 24
  assert len(list((tmp_path / 'prepared' / 'carla_scenes').iterdir())) == 1
