"""Training augmentation, written once for numpy (streaming) and jax.numpy
(device cache): `xp` is the array module, so both data modes apply exactly the
same transformations from the same random draws.

Each example's augmentation is driven by `NUM_AUGMENT_UNIFORMS` uniform
numbers; `epoch_uniforms(num_examples, seed, epoch)` draws them for a whole
epoch at once, row k for the epoch's k-th example (its slot), so the
augmentation of an epoch is a pure function of (seed, epoch) and a resumed
run sees the same examples.

Copy-paste (`paste_objects`) is the one transformation that takes a second
frame: the rare-class pixels of a donor (`schedules.paste_donors`) land on
the example before its own flip, scale and crop.

Rare-class windows (`Augment.rare_windows`) place a share of the training
windows over a rare-class pixel instead of anywhere: a rare class present in
the frame is chosen with equal chance, then one of its pixels, which lands at
a random place inside the window. Thin and small objects (poles, signs,
lights, pedestrians) then fill more of what training sees, without drawing
any frame more often.
"""

import dataclasses

import numpy as np

# Uniform numbers drawn per example: flip, scale, crop top, crop left,
# brightness, contrast, saturation, then the rare-class window's: whether,
# which class, which pixel.
NUM_AUGMENT_UNIFORMS = 10


@dataclasses.dataclass(frozen=True)
class Augment:
  """Training augmentation. `crop_size` (height, width): the output is a crop
  of that size of the frame scaled by a factor in `scale_range`; None keeps
  the frame's size (then scale > 1 zooms in and crops back to it).
  `copy_paste`: the share of examples that receive a donor frame's rare-class
  pixels (`paste_objects`; the pipeline draws the donors). `rare_windows`: the
  share of windows placed over a pixel of one of `rare_classes` (label ids)
  when the frame holds any (module docstring)."""
  horizontal_flip: bool = False
  scale_range: tuple[float, float] = (1.0, 1.0)
  brightness: float = 0.0
  contrast: float = 0.0
  saturation: float = 0.0
  crop_size: tuple[int, int] | None = None
  copy_paste: float = 0.0
  rare_windows: float = 0.0
  rare_classes: tuple[int, ...] = ()

  @classmethod
  def from_config(cls, augment, crop_size=None, rare_classes=()) -> 'Augment':
    return cls(bool(augment.horizontal_flip), tuple(float(s) for s in augment.scale_range),
               float(augment.brightness), float(augment.contrast), float(augment.saturation),
               tuple(int(n) for n in crop_size) if crop_size else None,
               float(augment.get('copy_paste', 0.0)), float(augment.get('rare_windows', 0.0)),
               tuple(int(c) for c in rare_classes))

  @property
  def places_windows(self) -> bool:
    """Whether windows go over rare-class pixels (needs classes and a share)."""
    return self.rare_windows > 0 and bool(self.rare_classes)

  @property
  def enabled(self) -> bool:
    return (self.horizontal_flip or self.scale_range != (1.0, 1.0) or
            self.crop_size is not None or self.copy_paste > 0 or
            any((self.brightness, self.contrast, self.saturation)))


def paste_objects(xp, image, label, donor_image, donor_label, paste_classes, mirrored, pasted=True):
  """Copy-paste: the donor's pixels of `paste_classes` replace the example's.

  image/donor_image [H, W, 3] and label/donor_label [H, W] at the same size;
  the donor is mirrored left-right first if `mirrored`; nothing changes where
  `pasted` is false. Objects keep their place in the frame (a pedestrian on
  the pavement stays on a pavement's side of the road) and pasted pixels take
  the donor's label, so no label is ever invented.
  """
  donor_image = xp.where(mirrored, donor_image[:, ::-1], donor_image)
  donor_label = xp.where(mirrored, donor_label[:, ::-1], donor_label)
  mask = xp.isin(donor_label, xp.asarray(list(paste_classes), donor_label.dtype)) & pasted
  return (xp.where(mask[..., None], donor_image, image).astype(image.dtype),
          xp.where(mask, donor_label, label).astype(label.dtype))


def _sample_positions(xp, out_length: int, in_length: int, scale, start_fraction, flip):
  """Source coordinates of the output pixels along one axis.

  The frame scaled by `scale`, cropped to `out_length` pixels at
  start_fraction of the free range: in source pixels a window of
  out_length/scale (scale > 1 zooms in; a window longer than the frame
  repeats the border).
  """
  window = out_length / scale
  start = start_fraction * (in_length - window)
  positions = start + (xp.arange(out_length, dtype=xp.float32) + 0.5) / scale - 0.5
  if flip is not None:
    positions = xp.where(flip, (in_length - 1) - positions, positions)
  return positions


def _rare_pixel(xp, label, rare_classes, class_uniform, pixel_uniform):
  """(row, column, found): a pixel of one rare class present in `label` [H, W].

  The class is chosen with equal chance among the rare classes present, so a
  traffic light weighs as much as a pole; the pixel uniformly among its pixels.
  found is false when the label holds none (row and column are then 0).
  """
  width = label.shape[1]
  masks = (label[None] == xp.asarray(list(rare_classes), label.dtype)[:, None, None])
  masks = masks.reshape(len(rare_classes), -1)
  counts = masks.sum(axis=1)
  present = counts > 0
  num_present = present.sum()
  wanted = xp.minimum(xp.floor(class_uniform * num_present), num_present - 1)
  chosen = xp.argmax(present & (xp.cumsum(present) - 1 == wanted))
  target = xp.floor(pixel_uniform * counts[chosen])
  flat = xp.argmax(xp.cumsum(masks[chosen]) > target)
  return flat // width, flat % width, num_present > 0


def _fraction_over(xp, pixel, in_length: int, out_length: int, scale, place):
  """The window start fraction (as `_sample_positions` takes it) that puts
  source `pixel` at `place` (0 to 1) along the window, or as near as the
  frame's edges allow; 0 when the window holds the whole length."""
  window = out_length / scale
  free = in_length - window
  start = pixel + 0.5 - place * window
  return xp.where(free > 0, xp.clip(start / xp.where(free > 0, free, 1.0), 0.0, 1.0), 0.0)


def _linear_take(xp, array, positions, axis: int):
  length = array.shape[axis]
  positions = xp.clip(positions, 0, length - 1)
  lower = xp.floor(positions).astype(xp.int32)
  upper = xp.minimum(lower + 1, length - 1)
  weight = (positions - lower).astype(xp.float32)
  weight = weight.reshape((-1, 1, 1) if axis == 0 else (1, -1, 1))
  return xp.take(array, lower, axis=axis) * (1 - weight) + xp.take(array, upper, axis=axis) * weight


def _nearest_take(xp, array, positions, axis: int):
  index = xp.clip(xp.floor(positions + 0.5), 0, array.shape[axis] - 1).astype(xp.int32)
  return xp.take(array, index, axis=axis)


def augment_example(xp, image, label, uniforms, augment: Augment):
  """Augments one example. image float32 [H, W, 3] in [0, 1], label [H, W];
  uniforms [NUM_AUGMENT_UNIFORMS] in [0, 1).

  The flip and the scale-and-crop move image and label by the same sampling
  positions (image bilinear, label nearest, so labels are never blended);
  colour jitter touches the image only. The output is augment.crop_size, or
  [H, W] without a crop size. With `augment.rare_windows`, that share of
  windows is placed over a rare-class pixel (module docstring).
  """
  height, width = label.shape
  out_height, out_width = augment.crop_size or (height, width)
  if (augment.horizontal_flip or augment.scale_range != (1.0, 1.0) or
      (out_height, out_width) != (height, width)):
    low, high = augment.scale_range
    scale = low + (high - low) * uniforms[1]
    flip = uniforms[0] < 0.5 if augment.horizontal_flip else None
    top, left = uniforms[2], uniforms[3]
    if augment.places_windows:
      row, col, found = _rare_pixel(xp, label, augment.rare_classes, uniforms[8], uniforms[9])
      placed = found & (uniforms[7] < augment.rare_windows)
      if flip is not None:  # a mirrored window covers the mirror of its columns
        col = xp.where(flip, width - 1 - col, col)
      # The pixel lands at (top, left) of the window: anywhere in it.
      top = xp.where(placed, _fraction_over(xp, row, height, out_height, scale, top), top)
      left = xp.where(placed, _fraction_over(xp, col, width, out_width, scale, left), left)
    rows = _sample_positions(xp, out_height, height, scale, top, None)
    cols = _sample_positions(xp, out_width, width, scale, left, flip)
    image = _linear_take(xp, _linear_take(xp, image, rows, 0), cols, 1)
    label = _nearest_take(xp, _nearest_take(xp, label, rows, 0), cols, 1)
  if augment.saturation:
    grey = (image @ xp.asarray([0.299, 0.587, 0.114], xp.float32))[..., None]
    image = grey + (1 + augment.saturation * (2 * uniforms[6] - 1)) * (image - grey)
  if augment.contrast:
    mean = xp.mean(image @ xp.asarray([0.299, 0.587, 0.114], xp.float32))
    image = mean + (1 + augment.contrast * (2 * uniforms[5] - 1)) * (image - mean)
  if augment.brightness:
    image = image + augment.brightness * (2 * uniforms[4] - 1)
  return xp.clip(image, 0.0, 1.0).astype(xp.float32), label


def epoch_uniforms(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """float32 [num_examples, NUM_AUGMENT_UNIFORMS]: row k drives the augmentation
  of the epoch's k-th example (slot k of `train_schedule`), whichever mode
  delivers it (one vectorised draw an epoch; the trailing 1 keeps the stream
  apart from `epoch_order`'s). The rare-class window's three columns come from
  a stream of their own (trailing 2), so the first seven are the same draws
  they were before those columns existed."""
  base = np.random.default_rng([seed, epoch, 1]).random((num_examples, 7), dtype=np.float32)
  windows = np.random.default_rng([seed, epoch, 2]).random(
      (num_examples, NUM_AUGMENT_UNIFORMS - 7), dtype=np.float32)
  return np.concatenate([base, windows], axis=1)
