"""Losses: cross-entropy with class weights, and the Lovasz-softmax against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import losses


def _numpy_cross_entropy(logits, labels):
  logits = logits - logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]


def test_loss_is_the_mean_cross_entropy_over_valid_pixels():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=(2, 3, 4))
  labels[0, 0, :2] = 255  # ignore label
  labels[1, 2, 3] = 7  # out of range: never counted
  per_pixel = _numpy_cross_entropy(logits, np.where((labels == 255) | (labels == 7), 0, labels))
  keep = (labels != 255) & (labels != 7)
  loss_sum, weight_sum = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels),
                                                 ignore_label=255)
  assert float(weight_sum) == keep.sum()
  assert float(loss_sum / weight_sum) == pytest.approx(per_pixel[keep].mean(), rel=1e-5)

  valid = np.array([True, False])  # a padding example weighs nothing
  loss_sum, weight_sum = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels),
                                                 ignore_label=255, valid=jnp.asarray(valid))
  keep_valid = keep & valid[:, None, None]
  assert float(loss_sum / weight_sum) == pytest.approx(per_pixel[keep_valid].mean(), rel=1e-5)


def test_class_weights_give_the_weighted_mean():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(1, 4, 4, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(1, 4, 4))
  class_weights = np.array([0.5, 2.0, 4.0], np.float32)
  per_pixel = _numpy_cross_entropy(logits, labels)
  w = class_weights[labels]
  loss_sum, weight_sum = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels),
                                                 class_weights=class_weights)
  assert float(loss_sum / weight_sum) == pytest.approx((w * per_pixel).sum() / w.sum(), rel=1e-5)


def test_hard_pixel_mining_keeps_the_pixels_of_largest_loss_then_weighs_them():
  # Four pixels of two classes, class weights [1, 3]. Per-pixel cross-entropy
  # of two logits [a, b]: log(1 + exp(other - own)).
  logits = np.array([[[[2.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 0.0]]]], np.float32)
  labels = np.array([[[0, 0, 1, 1]]])
  ce = np.log1p(np.exp([-2.0, 0.0, -1.0, 1.0]))  # 0.127, 0.693, 0.313, 1.313
  w = np.array([1.0, 1.0, 3.0, 3.0])
  weights = np.array([1.0, 3.0], np.float32)

  def mean(**kwargs):
    loss_sum, weight_sum = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(labels),
                                                   class_weights=weights, **kwargs)
    return float(loss_sum / weight_sum), float(weight_sum)

  # half of 4 pixels: the two of largest loss, pixels 3 and 1 (pixel 2's weighted
  # loss, 0.940, is larger than pixel 1's, but the ranking is before the weights)
  assert mean(hard_fraction=0.5) == (pytest.approx((ce[1] + 3 * ce[3]) / 4, rel=1e-5), 4.0)
  # 0.6 of 4 is 2.4: three pixels, 3, 1 and 2
  three = (ce[1] + 3 * ce[2] + 3 * ce[3]) / 7
  assert mean(hard_fraction=0.6) == (pytest.approx(three, rel=1e-5), 7.0)
  assert mean(hard_fraction=1.0) == (pytest.approx((w * ce).sum() / w.sum(), rel=1e-5), 8.0)
  # an unscored pixel is never kept, even when fewer than k pixels are scored
  ignored = labels.copy()
  ignored[0, 0, 3] = 255
  loss_sum, weight_sum = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(ignored),
                                                 ignore_label=255, class_weights=weights,
                                                 hard_fraction=0.25)
  assert float(weight_sum) == 1.0 and float(loss_sum) == pytest.approx(ce[1], rel=1e-5)
  loss_sum, weight_sum = losses.segmentation_loss(jnp.asarray(logits), jnp.asarray(ignored),
                                                 ignore_label=255, class_weights=weights,
                                                 hard_fraction=1.0 - 1e-6)
  assert float(weight_sum) == 5.0


def test_hard_pixel_mining_gradient_reaches_only_the_kept_pixels():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(2, 4, 4, 3)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 3, size=(2, 4, 4)))
  per_pixel = _numpy_cross_entropy(np.asarray(logits), np.asarray(labels))
  kept = per_pixel >= np.sort(per_pixel.ravel())[-8]  # the 8 hardest of 32

  def mean(x):
    loss_sum, weight_sum = losses.segmentation_loss(x, labels, hard_fraction=0.25)
    return loss_sum / weight_sum

  assert float(mean(logits)) == pytest.approx(per_pixel[kept].mean(), rel=1e-5)
  grad = np.abs(np.asarray(jax.grad(mean)(logits))).sum(-1)
  assert np.all(grad[kept] > 0) and np.all(grad[~kept] == 0)


def test_class_weights_from_counts():
  counts = np.array([0, 900, 90, 10])
  inverse = losses.class_weights_from_counts(counts, 'inverse', max_weight=100.0)
  np.testing.assert_allclose(inverse, [1.0, 1000 / (3 * 900), 1000 / (3 * 90), 1000 / (3 * 10)],
                             rtol=1e-6)
  median = losses.class_weights_from_counts(counts, 'median', max_weight=5.0)
  np.testing.assert_allclose(median, [1.0, 0.1, 1.0, 5.0], rtol=1e-6)  # 9.0 capped at 5
  assert losses.class_weights_from_counts(counts, 'none', 10.0) is None


def test_lovasz_grad_by_hand():
  # Ground truth [1, 0, 1] in the errors' order: 2 foreground pixels.
  # intersection 2 - cumsum = [1, 1, 0]; union 2 + cumsum(1 - gt) = [2, 3, 3];
  # Jaccard loss 1 - i/u = [1/2, 2/3, 1]; increments [1/2, 1/6, 1/3].
  np.testing.assert_allclose(losses.lovasz_grad(jnp.array([1.0, 0.0, 1.0])), [1 / 2, 1 / 6, 1 / 3],
                             rtol=1e-6)


def test_lovasz_softmax_by_hand():
  # Two classes, three scored pixels with p(class 1) = 0.9, 0.4, 0.2 and
  # labels 1, 1, 0, and a fourth pixel labelled 7 (out of range: not scored).
  # Class 1: foreground [1, 1, 0], errors |fg - p1| = [0.1, 0.6, 0.2];
  #   sorted 0.6 (fg 1), 0.2 (fg 0), 0.1 (fg 1): the ground truth [1, 0, 1]
  #   of test_lovasz_grad_by_hand, weights [1/2, 1/6, 1/3]:
  #   0.6/2 + 0.2/6 + 0.1/3 = 0.3 + 1/30 + 1/30 = 11/30.
  # Class 0: foreground [0, 0, 1], p0 = [0.1, 0.6, 0.8], errors [0.1, 0.6, 0.2];
  #   sorted 0.6 (fg 0), 0.2 (fg 1), 0.1 (fg 0): intersection [1, 0, 0],
  #   union [2, 2, 3], Jaccard loss [1/2, 1, 1], weights [1/2, 1/2, 0]:
  #   0.6/2 + 0.2/2 + 0 = 0.4.
  # Mean over the two present classes: (11/30 + 12/30) / 2 = 23/60.
  p1 = np.array([0.9, 0.4, 0.2, 0.5])
  logits = np.log(np.stack([1 - p1, p1], axis=-1)).reshape(1, 2, 2, 2).astype(np.float32)
  labels = np.array([1, 1, 0, 7]).reshape(1, 2, 2)
  loss = losses.lovasz_softmax(jnp.asarray(logits), jnp.asarray(labels))
  assert float(loss) == pytest.approx(23 / 60, rel=1e-5)
  # The same pixels with the fourth marked by ignore_label or by an invalid example.
  labels[0, 1, 1] = 255
  assert float(losses.lovasz_softmax(jnp.asarray(logits), jnp.asarray(labels),
                                     ignore_label=255)) == pytest.approx(23 / 60, rel=1e-5)
  doubled = np.concatenate([logits, np.zeros_like(logits)])
  labels = np.concatenate([labels, np.zeros_like(labels)])
  assert float(losses.lovasz_softmax(jnp.asarray(doubled), jnp.asarray(labels), ignore_label=255,
                                     valid=jnp.array([True, False]))) == pytest.approx(23 / 60,
                                                                                       rel=1e-5)


def test_lovasz_softmax_of_one_hot_predictions_is_one_minus_mean_iou():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, size=(2, 6, 7))
  labels[labels == 3] = 2  # class 3 absent from the labels: left out
  predicted = np.where(rng.random(labels.shape) < 0.7, labels, rng.integers(0, 4, labels.shape))
  logits = 60.0 * np.eye(4, dtype=np.float32)[predicted]
  ious = [((labels == c) & (predicted == c)).sum() / ((labels == c) | (predicted == c)).sum()
          for c in range(3)]
  loss = losses.lovasz_softmax(jnp.asarray(logits), jnp.asarray(labels))
  assert float(loss) == pytest.approx(1 - np.mean(ious), abs=1e-5)
  assert float(losses.lovasz_softmax(jnp.asarray(60.0 * np.eye(4, dtype=np.float32)[labels]),
                                     jnp.asarray(labels))) == pytest.approx(0.0, abs=1e-6)


def test_lovasz_softmax_gradient_lowers_the_loss():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(1, 5, 5, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, size=(1, 5, 5)))
  loss_fn = lambda x: losses.lovasz_softmax(x, labels)
  value, grad = jax.value_and_grad(loss_fn)(logits)
  assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) > 0
  assert float(loss_fn(logits - 1.0 * grad)) < float(value)
