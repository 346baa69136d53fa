"""Colour masks, overlays and the two figures."""

import numpy as np
from PIL import Image
import pytest

from unet_jax import classes
from unet_jax import visualize


def test_colorize_gives_each_class_its_palette_colour():
  mask = np.arange(classes.NUM_CLASSES, dtype=np.uint8).reshape(1, -1)
  colours = visualize.colorize(mask)
  assert colours.dtype == np.uint8 and colours.shape == (1, classes.NUM_CLASSES, 3)
  np.testing.assert_array_equal(colours[0], classes.PALETTE)
  # CARLA's road is purple and its vehicles dark blue.
  assert tuple(visualize.colorize(np.array([[7]]))[0, 0]) == (128, 64, 128)
  assert tuple(visualize.colorize(np.array([[10]]))[0, 0]) == (0, 0, 142)


def test_palette_has_one_distinct_colour_per_class():
  assert classes.PALETTE.shape == (classes.NUM_CLASSES, 3)
  assert len({tuple(colour) for colour in classes.PALETTE}) == classes.NUM_CLASSES


def test_colorize_refuses_indices_outside_the_palette():
  with pytest.raises(ValueError, match='0..22'):
    visualize.colorize(np.array([[0, 23]]))
  with pytest.raises(ValueError):
    visualize.colorize(np.array([[-1]]))


def test_overlay_blends_image_and_colour():
  image = np.full((2, 3, 3), 100, np.uint8)
  mask = np.full((2, 3), 7, np.uint8)  # road (128, 64, 128)
  np.testing.assert_array_equal(visualize.overlay(image, mask, alpha=0.0), image)
  np.testing.assert_array_equal(visualize.overlay(image, mask, alpha=1.0),
                                np.broadcast_to(classes.PALETTE[7], (2, 3, 3)))
  np.testing.assert_array_equal(visualize.overlay(image, mask, alpha=0.5)[0, 0], (114, 82, 114))
  with pytest.raises(ValueError, match='differ in size'):
    visualize.overlay(image, mask[:1])


def test_disagreement_marks_wrong_right_and_unscored_pixels():
  truth = np.array([[1, 2, 3]])
  prediction = np.array([[1, 0, 0]])
  scored = np.array([[True, True, False]])
  picture = visualize.disagreement(truth, prediction, scored)
  np.testing.assert_array_equal(picture[0, 0], visualize.RIGHT_COLOUR)
  np.testing.assert_array_equal(picture[0, 1], visualize.WRONG_COLOUR)
  np.testing.assert_array_equal(picture[0, 2], visualize.UNSCORED_COLOUR)


def test_row_normalize_makes_rows_of_present_classes_sum_to_one():
  confusion = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
  normalized = visualize.row_normalize(confusion)
  np.testing.assert_allclose(normalized.sum(axis=1), [1, 0, 1])
  np.testing.assert_allclose(normalized[0], [0.75, 0.25, 0])


def test_figures_are_written_as_png(tmp_path):
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (16, 24, 3), dtype=np.uint8) for _ in range(2)]
  truths = [rng.integers(0, 4, (16, 24)) for _ in range(2)]
  predictions = [rng.integers(0, 4, (16, 24)) for _ in range(2)]
  visualize.examples_figure(tmp_path / 'examples.png', images, truths, predictions,
                            titles=['a', 'b'])
  confusion = rng.integers(0, 50, (classes.NUM_CLASSES, classes.NUM_CLASSES))
  visualize.confusion_figure(tmp_path / 'confusion.png', confusion)
  for name in ('examples.png', 'confusion.png'):
    with Image.open(tmp_path / name) as picture:
      assert picture.format == 'PNG'
      assert picture.width > 300 and picture.height > 100
  with pytest.raises(ValueError, match='same non-zero number'):
    visualize.examples_figure(tmp_path / 'bad.png', images, truths, predictions[:1])
