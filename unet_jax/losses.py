"""The training loss, shared by training and evaluation."""

import jax.numpy as jnp
import optax


def segmentation_loss(logits, labels, *, valid=None, ignore_label: int = -1, class_weights=None):
  """Softmax cross-entropy averaged over valid pixels.

  Returns (sum of weighted per-pixel losses, sum of weights); the mean is
  their ratio. Pixels labelled `ignore_label`, outside [0, num_classes), or
  in an example with valid=False weigh nothing. With class weights the mean
  is the weighted mean sum(w * loss) / sum(w).
  """
  num_classes = logits.shape[-1]
  in_range = (labels >= 0) & (labels < num_classes) & (labels != ignore_label)
  if valid is not None:
    in_range &= valid.reshape(valid.shape + (1,) * (labels.ndim - valid.ndim))
  safe_labels = jnp.where(in_range, labels, 0)
  per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                              safe_labels)
  weights = in_range.astype(jnp.float32)
  if class_weights is not None:
    weights = weights * jnp.asarray(class_weights)[safe_labels]
  return jnp.sum(per_pixel * weights), jnp.sum(weights)
