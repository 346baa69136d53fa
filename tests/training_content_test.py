"""scripts/training_content.py: class shares of what training sees."""

import importlib.util

import numpy as np

from conftest import REPO
from conftest import tiny_config
from unet_jax import classes

_spec = importlib.util.spec_from_file_location('training_content',
                                               REPO / 'scripts' / 'training_content.py')
training_content = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(training_content)

RARE = [classes.CLASS_NAMES.index(c) for c in ('Pedestrian', 'Pole', 'TrafficSign', 'TrafficLight')]


def test_rare_windows_raise_the_rare_share_of_training_examples_only(synthetic_dir):
  def content(share):
    config = tiny_config(synthetic_dir, **{'data.train_crop_size': (16, 16),
                                           'data.augment.rare_windows': share})
    return training_content.training_content(config, epochs=2)

  plain, placed = content(0.0), content(1.0)
  for figures in (plain, placed):
    for key in ('frames', 'examples'):
      assert abs(figures[key].sum() - 1) < 1e-9
  np.testing.assert_array_equal(plain['frames'], placed['frames'])  # the frames are the frames
  assert placed['examples'][RARE].sum() > 1.5 * plain['examples'][RARE].sum()
  assert placed['holding'][RARE].max() > plain['holding'][RARE].max()
  # Small crops of a frame leave its large classes out of some examples.
  road = classes.CLASS_NAMES.index('Road')
  assert 0 < plain['holding'][road] < 1


def test_table_by_hand():
  content = {'frames': np.array([0.75, 0.25, 0.0, 0.0]), 'examples': np.array([0.5, 0.4, 0.1, 0.0]),
             'holding': np.array([1.0, 0.5, 0.25, 0.0])}
  rows = training_content.table(content, names=['A', 'B', 'C', 'D']).splitlines()[2:]
  assert rows == ['| A | 75.000 | 50.000 | 0.67 | 100 |', '| B | 25.000 | 40.000 | 1.60 | 50 |',
                  '| C | 0.000 | 10.000 | - | 25 |']  # D is in neither: left out
