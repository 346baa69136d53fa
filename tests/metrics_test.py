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


def test_where_the_errors_go_by_hand():
  confusion = np.array([[6, 3, 1, 0],   # class 0: 10 true pixels
                        [2, 4, 0, 0],   # class 1: 6
                        [0, 0, 0, 0],   # class 2: only predicted (once, for a 0)
                        [0, 0, 0, 0]])  # class 3: absent, left out
  by_class = {b['index']: b for b in metrics.error_breakdown(confusion)}
  assert sorted(by_class) == [0, 1, 2]
  zero, one, two = by_class[0], by_class[1], by_class[2]
  # Class 0: 6 of its 10 pixels right, 3 went to 1 and 1 to 2; 8 predicted, 2 of them 1s.
  assert zero['recall'] == pytest.approx(0.6) and zero['precision'] == pytest.approx(0.75)
  assert zero['predicted_over_truth'] == pytest.approx(0.8)
  assert zero['missed_as'] == [(1, pytest.approx(0.3)), (2, pytest.approx(0.1))]
  assert zero['mistaken_for'] == [(1, pytest.approx(0.25))]
  # Class 1: 4 of 6 right, 2 went to 0; 7 predicted, 3 of them 0s.
  assert one['recall'] == pytest.approx(4 / 6) and one['precision'] == pytest.approx(4 / 7)
  assert one['predicted_over_truth'] == pytest.approx(7 / 6)
  assert one['missed_as'] == [(0, pytest.approx(2 / 6))]
  assert one['mistaken_for'] == [(0, pytest.approx(3 / 7))]
  # Class 2: not in the truth, its one prediction was a 0.
  assert two['recall'] is None and two['predicted_over_truth'] is None
  assert two['precision'] == 0.0 and two['missed_as'] == []
  assert two['mistaken_for'] == [(0, 1.0)]
  # top=1 keeps the largest share; a tie goes to the lower class.
  assert metrics.error_breakdown(confusion, top=1)[0]['missed_as'] == [(1, pytest.approx(0.3))]
  tie = np.array([[2, 1, 1], [0, 1, 0], [0, 0, 1]])
  assert metrics.error_breakdown(tie, top=1)[0]['missed_as'] == [(1, pytest.approx(0.25))]
