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


def error_breakdown(confusion: np.ndarray, top: int = 2) -> list[dict]:
  """Where each class's errors go, for the classes in the truth or the prediction.

  Per class (rows are the truth, as in `confusion_matrix`): 'recall', the
  share of its true pixels predicted as it (None when it is not in the
  truth); 'precision', the share of the pixels predicted as it that are it
  (None when never predicted); 'predicted_over_truth', its predicted pixels
  over its true pixels (None when not in the truth); 'missed_as', the `top`
  other classes its true pixels went to most, as (class, share of its true
  pixels); 'mistaken_for', the `top` true classes of the pixels wrongly
  predicted as it, as (class, share of its predicted pixels). Shares of zero
  are left out; ties go to the lower class index.
  """
  confusion = np.asarray(confusion, dtype=np.float64)
  truth = confusion.sum(axis=1)
  predicted = confusion.sum(axis=0)

  def largest(counts, total, own):
    order = np.argsort(-counts, kind='stable')
    return [(int(j), float(counts[j] / total)) for j in order
            if j != own and counts[j] > 0][:top]

  breakdown = []
  for c in range(confusion.shape[0]):
    if truth[c] == 0 and predicted[c] == 0:
      continue
    hit = confusion[c, c]
    breakdown.append({
        'index': c,
        'recall': float(hit / truth[c]) if truth[c] else None,
        'precision': float(hit / predicted[c]) if predicted[c] else None,
        'predicted_over_truth': float(predicted[c] / truth[c]) if truth[c] else None,
        'missed_as': largest(confusion[c], truth[c], c) if truth[c] else [],
        'mistaken_for': largest(confusion[:, c], predicted[c], c) if predicted[c] else [],
    })
  return breakdown
