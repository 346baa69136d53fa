"""What training, evaluation and prediction all do to a frame: resize it to the
model's size (the image antialiased, the mask nearest so no new labels appear)
and crop labels to the region a VALID U-Net predicts. Host side, numpy."""

import numpy as np
from PIL import Image


def resize_pair(image: np.ndarray, mask: np.ndarray,
                size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Resizes an image (antialiased) and its mask (nearest, so no new labels) to (H, W)."""
  height, width = size
  if image.shape[:2] != (height, width):
    # Box-reduce to within 2x of the target first: also antialiased, and 3x faster.
    image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS,
                                                     reducing_gap=2.0))
  if mask.shape != (height, width):
    mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
  return image, mask


def centre_crop_label(label, label_size: tuple[int, int]):
  """Crops [..., H, W] to the centre [..., h, w]: the region a VALID U-Net predicts."""
  height, width = label.shape[-2:]
  top, left = (height - label_size[0]) // 2, (width - label_size[1]) // 2
  return label[..., top:top + label_size[0], left:left + label_size[1]]
