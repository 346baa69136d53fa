"""Scoring a model on a whole split: the pure evaluation step and its loop.

`eval_step(variables, batch)` returns an int32 confusion matrix and the
summed loss of a batch; `evaluate` adds them up exactly over a split. Used
by training's evaluations and by `unet_jax.evaluate`, so both give the same
numbers. With `per_example=True` the step returns one confusion matrix per
example, and `evaluate(..., groups=...)` also scores each group of examples
(the frames of one recording, say) on its own. Nothing here builds an
optimizer.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax import losses
from unet_jax import metrics as metrics_lib
from unet_jax import sharding


def eval_step(variables: dict, batch: dict, *, apply_fn, num_classes: int, ignore_label: int,
              per_example: bool = False):
  """The int32 confusion matrix of one batch ([B, C, C] with per_example) and its summed loss."""
  logits = apply_fn(variables, batch['image'], train=False)
  labels = batch['label']
  weights = batch['valid'][:, None, None] & (labels != ignore_label)
  count = functools.partial(metrics_lib.confusion_matrix, num_classes=num_classes)
  if per_example:
    confusion = jax.vmap(count)(labels, jnp.argmax(logits, -1), weights=weights)
  else:
    confusion = count(labels, jnp.argmax(logits, -1), weights=weights)
  loss_sum, weight_sum = losses.segmentation_loss(logits, labels, valid=batch['valid'],
                                                  ignore_label=ignore_label)
  return confusion, loss_sum, weight_sum


def compile_eval_step(config, mesh, model, apply_fn=None, per_example: bool = False):
  """The jitted eval step of `model`; `apply_fn` replaces model.apply (see unet_jax.tta)."""
  step = functools.partial(eval_step, apply_fn=apply_fn or model.apply,
                           num_classes=config.model.num_classes, ignore_label=config.ignore_label,
                           per_example=per_example)
  return jax.jit(step, in_shardings=(sharding.replicated(mesh), sharding.data_sharded(mesh)),
                 out_shardings=sharding.replicated(mesh))


def evaluate(eval_step_fn, variables, data, groups=None) -> dict:
  """Confusion matrix (int64, exact) and mean loss over a whole split.

  groups: a label per example (in the split's order) to score each group on
  its own too, with an eval step compiled with per_example=True. The summary
  then holds 'per_group': {label: the group's metrics, 'confusion_matrix'
  and 'num_examples'}, labels in sorted order; the groups' matrices add up
  to the split's.
  """
  if groups is not None:
    return _evaluate_groups(eval_step_fn, variables, data, list(groups))
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
  return _summary(confusion, loss_sum, weight_sum)


def _evaluate_groups(eval_step_fn, variables, data, groups: list) -> dict:
  if len(groups) != data.num_examples:
    raise ValueError(f'{len(groups)} group labels for {data.num_examples} examples')
  labels = sorted(set(groups))
  index_of = {label: i for i, label in enumerate(labels)}
  group_index = np.array([index_of[label] for label in groups], np.int64)
  confusions = None
  loss_sum, weight_sum, seen = 0.0, 0.0, 0
  # Examples come in the split's order; the last batch's padding is not counted.
  for batch in data.eval_batches():
    batch_confusion, batch_loss, batch_weight = eval_step_fn(variables, batch)
    counts = np.asarray(jax.device_get(batch_confusion), np.int64)  # [B, C, C]
    if counts.ndim != 3:
      raise ValueError('grouped evaluation needs an eval step compiled with per_example=True')
    if confusions is None:
      confusions = np.zeros((len(labels), *counts.shape[1:]), np.int64)
    real = counts[:max(0, min(len(counts), data.num_examples - seen))]
    np.add.at(confusions, group_index[seen:seen + len(real)], real)
    seen += len(counts)
    loss_sum += batch_loss
    weight_sum += batch_weight
  summary = _summary(confusions.sum(axis=0), loss_sum, weight_sum)
  summary['per_group'] = {}
  sizes = np.bincount(group_index, minlength=len(labels))
  for label, confusion, size in zip(labels, confusions, sizes):
    group = metrics_lib.summarize(confusion)
    group.update(confusion_matrix=confusion, num_examples=int(size))
    summary['per_group'][label] = group
  return summary


def _summary(confusion: np.ndarray, loss_sum, weight_sum) -> dict:
  summary = metrics_lib.summarize(confusion)
  summary['loss'] = float(loss_sum) / max(float(weight_sum), 1e-12)
  summary['confusion_matrix'] = confusion
  return summary


def _add(total: np.ndarray, device_counts) -> np.ndarray:
  counts = np.asarray(jax.device_get(device_counts), np.int64)
  return counts if total.size == 0 else total + counts
