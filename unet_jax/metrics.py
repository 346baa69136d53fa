"""Segmentation metrics from a confusion matrix.

The confusion matrix is accumulated on device as integers (exact), one
num_classes x num_classes matrix per split; everything else is derived from
it once, on the host, in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(labels: jax.Array, predictions: jax.Array, num_classes: int,
                     weights: jax.Array | None = None) -> jax.Array:
  """int32 [num_classes, num_classes]: rows are the truth, columns the prediction.

  Pixels whose label is outside [0, num_classes) or whose weight is False/0
  are not counted.
  """
  labels = labels.reshape(-1)
  predictions = predictions.reshape(-1)
  valid = (labels >= 0) & (labels < num_classes)
  if weights is not None:
    valid &= weights.reshape(-1).astype(bool)
  index = jnp.where(valid, labels * num_classes + predictions, 0)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(valid.astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def summarize(confusion: np.ndarray) -> dict:
  """Pixel accuracy, per-class and mean IoU and accuracy from a confusion matrix.

  Mean IoU averages over classes that occur in the truth or the prediction;
  mean class accuracy over classes that occur in the truth. A class that
  occurs in neither has IoU NaN and is left out of the means.
  """
  confusion = np.asarray(confusion, dtype=np.float64)
  true_positives = np.diag(confusion)
  truth = confusion.sum(axis=1)
  predicted = confusion.sum(axis=0)
  union = truth + predicted - true_positives
  total = confusion.sum()
  with np.errstate(invalid='ignore', divide='ignore'):
    iou = np.where(union > 0, true_positives / union, np.nan)
    class_accuracy = np.where(truth > 0, true_positives / truth, np.nan)
  return {
      'pixel_accuracy': float(true_positives.sum() / total) if total else float('nan'),
      'mean_iou': float(np.nanmean(iou)) if np.any(union > 0) else float('nan'),
      'mean_class_accuracy': float(np.nanmean(class_accuracy)) if np.any(truth > 0) else float('nan'),
      'per_class_iou': iou,
      'per_class_accuracy': class_accuracy,
      'pixel_count': truth.astype(np.int64),
  }
