"""Segmentation losses: weighted softmax cross-entropy and the Lovasz-softmax.

Both take logits [..., num_classes] and integer labels [...]; a pixel counts
if its label is in [0, num_classes), is not `ignore_label`, and its example
has valid=True. Class weights for the cross-entropy come from the training
split's pixel counts (`class_weights_from_counts`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax


def class_weights_from_counts(pixel_counts: np.ndarray, method: str,
                              max_weight: float) -> np.ndarray | None:
  """Per-class loss weights from training pixel counts; None for 'none'.

  'inverse': total / (classes present * count), so a uniform distribution
  gives 1 everywhere; 'median': median frequency / frequency (Eigen & Fergus).
  Absent classes get weight 1 (they never occur in a label), and no weight
  exceeds `max_weight`, so that a class of a handful of pixels cannot
  dominate the loss.
  """
  if method == 'none':
    return None
  counts = np.asarray(pixel_counts, np.float64)
  present = counts > 0
  frequency = counts / counts.sum()
  if method == 'inverse':
    weights = np.where(present, 1.0 / (present.sum() * np.maximum(frequency, 1e-12)), 1.0)
  elif method == 'median':
    weights = np.where(present, np.median(frequency[present]) / np.maximum(frequency, 1e-12), 1.0)
  else:
    raise ValueError(f"class_weighting must be 'none', 'inverse' or 'median', got {method!r}")
  return np.minimum(weights, max_weight).astype(np.float32)


def scored_pixels(labels, num_classes: int, *, valid=None, ignore_label: int = -1):
  """bool [...]: the pixels a loss counts (see the module docstring)."""
  scored = (labels >= 0) & (labels < num_classes) & (labels != ignore_label)
  if valid is not None:
    scored &= valid.reshape(valid.shape + (1,) * (labels.ndim - valid.ndim))
  return scored


def segmentation_loss(logits, labels, *, valid=None, ignore_label: int = -1, class_weights=None,
                      hard_fraction: float = 1.0):
  """Softmax cross-entropy averaged over valid pixels.

  Returns (sum of weighted per-pixel losses, sum of weights); the mean is
  their ratio. Pixels labelled `ignore_label`, outside [0, num_classes), or
  in an example with valid=False weigh nothing. With class weights the mean
  is the weighted mean sum(w * loss) / sum(w).

  hard_fraction < 1 mines hard pixels (bootstrapped cross-entropy): only
  the k = ceil(hard_fraction * n) scored pixels of largest loss count, n
  being the number of label pixels in the batch (pixels tied with the k-th
  all count; fewer than k when fewer are scored). They are ranked by their
  loss before the class weights, which then weigh the kept pixels: ranked
  after weighting, a frequent class (a weight of 0.01) would never be kept.
  """
  in_range = scored_pixels(labels, logits.shape[-1], valid=valid, ignore_label=ignore_label)
  safe_labels = jnp.where(in_range, labels, 0)
  per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                              safe_labels)
  weights = in_range.astype(jnp.float32)
  if class_weights is not None:
    weights = weights * jnp.asarray(class_weights)[safe_labels]
  if hard_fraction < 1.0:
    hardness = jax.lax.stop_gradient(jnp.where(in_range, per_pixel, -1.0))  # losses are >= 0
    k = max(1, math.ceil(hard_fraction * hardness.size))
    kth = jax.lax.top_k(hardness.reshape(-1), k)[0][-1]
    weights = jnp.where(hardness >= kth, weights, 0.0)
  return jnp.sum(per_pixel * weights), jnp.sum(weights)


def lovasz_grad(sorted_foreground):
  """The Lovasz extension's weights for errors sorted in decreasing order.

  sorted_foreground [..., N] (0/1, the ground truth in the errors' order):
  the increments of the Jaccard loss 1 - |gt & top k| / |gt | top k| as the
  k-th pixel joins the predicted set (Berman et al. 2018, Alg. 1).
  """
  total = jnp.sum(sorted_foreground, axis=-1, keepdims=True)
  intersection = total - jnp.cumsum(sorted_foreground, axis=-1)
  union = total + jnp.cumsum(1.0 - sorted_foreground, axis=-1)
  jaccard = 1.0 - intersection / union
  return jnp.concatenate([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], axis=-1)


def lovasz_softmax(logits, labels, *, valid=None, ignore_label: int = -1):
  """The Lovasz-softmax loss (Berman, Rannen Triki & Blaschko, CVPR 2018).

  A convex surrogate of 1 - IoU per class: for each class present in the
  labels, the pixel errors |[label == c] - p_c| over every scored pixel of the
  batch, sorted in decreasing order, dotted with `lovasz_grad`; the mean over
  those classes. With one-hot probabilities it equals 1 - the mean IoU of the
  batch's present classes. Unscored pixels get error 0 and no foreground,
  which leaves the value unchanged.
  """
  num_classes = logits.shape[-1]
  scored = scored_pixels(labels, num_classes, valid=valid, ignore_label=ignore_label).reshape(-1)
  probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(-1, num_classes)
  foreground = ((labels.reshape(-1, 1) == jnp.arange(num_classes)) & scored[:, None])
  foreground = foreground.astype(jnp.float32).T  # [C, N]
  errors = jnp.where(scored, jnp.abs(foreground - probabilities.T), 0.0)
  negative_sorted, foreground_sorted = jax.lax.sort((-errors, foreground), dimension=-1,
                                                    num_keys=1)
  per_class = jnp.sum(-negative_sorted * jax.lax.stop_gradient(lovasz_grad(foreground_sorted)),
                      axis=-1)
  present = jnp.sum(foreground, axis=-1) > 0
  return jnp.sum(jnp.where(present, per_class, 0.0)) / jnp.maximum(jnp.sum(present), 1)
