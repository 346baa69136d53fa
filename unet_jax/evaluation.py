"""Scoring a model on a whole split: the pure evaluation step and its loop.

`eval_step(variables, batch)` returns an int32 confusion matrix and the
summed loss of a batch; `evaluate` adds them up exactly over a split. Used
by training's evaluations and by `unet_jax.evaluate`, so both give the same
numbers. Nothing here builds an optimizer.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax import losses
from unet_jax import metrics as metrics_lib
from unet_jax import sharding


def eval_step(variables: dict, batch: dict, *, apply_fn, num_classes: int, ignore_label: int):
  """The int32 confusion matrix of one batch and its summed loss."""
  logits = apply_fn(variables, batch['image'], train=False)
  labels = batch['label']
  weights = batch['valid'][:, None, None] & (labels != ignore_label)
  confusion = metrics_lib.confusion_matrix(labels, jnp.argmax(logits, -1), num_classes, weights)
  loss_sum, weight_sum = losses.segmentation_loss(logits, labels, valid=batch['valid'],
                                                  ignore_label=ignore_label)
  return confusion, loss_sum, weight_sum


def compile_eval_step(config, mesh, model, apply_fn=None):
  """The jitted eval step of `model`; `apply_fn` replaces model.apply (see unet_jax.tta)."""
  step = functools.partial(eval_step, apply_fn=apply_fn or model.apply,
                           num_classes=config.model.num_classes, ignore_label=config.ignore_label)
  return jax.jit(step, in_shardings=(sharding.replicated(mesh), sharding.data_sharded(mesh)),
                 out_shardings=sharding.replicated(mesh))


def evaluate(eval_step_fn, variables, data) -> dict:
  """Confusion matrix (int64, exact) and mean loss over a whole split."""
  num_pixels = data.global_batch_size * math.prod(data.label_size)
  flush_every = max(1, (2**31 - 1) // num_pixels)  # int32 counts on device never overflow
  confusion = np.zeros((0, 0), np.int64)
  pending, loss_sum, weight_sum = None, 0.0, 0.0
  for i, batch in enumerate(data.eval_batches()):
    batch_confusion, batch_loss, batch_weight = eval_step_fn(variables, batch)
    pending = batch_confusion if pending is None else pending + batch_confusion
    loss_sum += batch_loss
    weight_sum += batch_weight
    if (i + 1) % flush_every == 0:
      confusion = _add(confusion, pending)
      pending = None
  if pending is not None:
    confusion = _add(confusion, pending)
  summary = metrics_lib.summarize(confusion)
  summary['loss'] = float(loss_sum) / max(float(weight_sum), 1e-12)
  summary['confusion_matrix'] = confusion
  return summary


def _add(total: np.ndarray, device_counts) -> np.ndarray:
  counts = np.asarray(jax.device_get(device_counts), np.int64)
  return counts if total.size == 0 else total + counts
