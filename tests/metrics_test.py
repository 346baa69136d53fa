"""Confusion matrix and derived metrics against a NumPy reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import metrics


def _numpy_confusion(labels, predictions, num_classes, weights):
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for t, p, w in zip(labels.ravel(), predictions.ravel(), weights.ravel()):
    if w and 0 <= t < num_classes:
      confusion[t, p] += 1
  return confusion


def _numpy_iou(labels, predictions, num_classes, weights):
  ious = []
  for c in range(num_classes):
    truth = (labels == c) & weights
    predicted = (predictions == c) & weights & (labels >= 0)
    union = np.sum(truth | predicted)
    if union:
      ious.append(np.sum(truth & predicted) / union)
  return np.mean(ious)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_confusion_and_metrics_match_numpy(seed):
  rng = np.random.default_rng(seed)
  num_classes = 7
  labels = rng.integers(-1, num_classes, size=(3, 10, 12))  # -1: ignored pixels
  predictions = rng.integers(0, num_classes, size=labels.shape)
  agree = rng.random(labels.shape) < 0.4  # make some pixels right
  predictions[agree] = np.maximum(labels, 0)[agree]
  weights = rng.random(labels.shape) < 0.8
  confusion = np.asarray(metrics.confusion_matrix(jnp.asarray(labels), jnp.asarray(predictions),
                                                  num_classes, jnp.asarray(weights)))
  expected = _numpy_confusion(labels, predictions, num_classes, weights)
  np.testing.assert_array_equal(confusion, expected)

  summary = metrics.summarize(confusion)
  valid = weights & (labels >= 0)
  assert summary['pixel_accuracy'] == pytest.approx(np.mean(labels[valid] == predictions[valid]))
  assert summary['mean_iou'] == pytest.approx(_numpy_iou(labels, predictions, num_classes, valid))
  class_accuracy = [np.mean(predictions[valid & (labels == c)] == c)
                    for c in range(num_classes) if np.any(valid & (labels == c))]
  assert summary['mean_class_accuracy'] == pytest.approx(np.mean(class_accuracy))
  np.testing.assert_array_equal(summary['pixel_count'],
                                [np.sum(valid & (labels == c)) for c in range(num_classes)])


def test_classes_absent_from_truth_and_prediction_are_left_out_of_the_mean():
  confusion = np.zeros((4, 4), np.int64)
  confusion[0, 0] = 3  # class 0: IoU 3/4
  confusion[0, 1] = 1  # class 1 only predicted: IoU 0
  summary = metrics.summarize(confusion)
  assert np.isnan(summary['per_class_iou'][2]) and np.isnan(summary['per_class_iou'][3])
  assert summary['mean_iou'] == pytest.approx((0.75 + 0.0) / 2)
  assert summary['mean_class_accuracy'] == pytest.approx(0.75)  # class 1 absent from truth
  assert summary['pixel_accuracy'] == pytest.approx(0.75)
