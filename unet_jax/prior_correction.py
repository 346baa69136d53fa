"""Taking training's class-weight prior back out of the predictions.

Cross-entropy with class weights w (`config.class_weighting`) pulls the model
towards probabilities proportional to w_c p(c | x): a class with a large
weight is painted beyond its own pixels (poles over the sky beside them,
docs/quality.md). `evaluate` and `predict` can subtract s * log w_c from
every class's log-probability before the argmax: strength s = 0 leaves the
model as trained; s = 1 undoes the weights (for plain cross-entropy, the
unweighted posterior, which maximises pixel accuracy rather than IoU).

Training writes the weights it used to `<workdir>/class_weights.json`, so a
workdir alone is enough here; nothing of training is imported.
"""

from collections.abc import Callable
import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax import errors

WEIGHTS_FILE = 'class_weights.json'


def save(workdir: str, weights, *, method: str, cap: float) -> None:
  """Writes the class weights of a run (process 0; replaced atomically)."""
  if jax.process_index() != 0:
    return
  path = pathlib.Path(workdir) / WEIGHTS_FILE
  temporary = path.with_suffix('.json.tmp')
  temporary.write_text(json.dumps({'class_weighting': method, 'class_weight_max': float(cap),
                                   'weights': [float(w) for w in np.asarray(weights)]},
                                  indent=2) + '\n')
  os.replace(temporary, path)


def load(workdir: str, num_classes: int) -> np.ndarray:
  """The class weights training used, float32 [num_classes]; a clear error otherwise."""
  path = pathlib.Path(workdir) / WEIGHTS_FILE
  if not path.exists():
    raise errors.UserError(
        f'{path} does not exist: the run was trained before training recorded its class '
        'weights; run its training command again on this workdir (a finished run trains no '
        'further) or leave the prior in (--prior_correction=0)')
  try:
    weights = json.loads(path.read_text())['weights']
    weights = np.asarray(weights, dtype=np.float64)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
          ValueError) as error:
    raise errors.UserError(f'{path} is not a class-weights file: {error}') from None
  if weights.shape != (num_classes,) or not np.all(np.isfinite(weights)) or np.any(weights <= 0):
    raise errors.UserError(f'{path}: expected {num_classes} finite weights > 0, got '
                           f'{weights.tolist()}')
  return weights.astype(np.float32)


def strength(config, value: float | None = None) -> float:
  """The strength to use: `value` where given, else the config's
  `inference.prior_correction`, else 0."""
  if value is None:
    value = (config.get('inference') or {}).get('prior_correction', 0.0)
  value = float(value)
  if not (math.isfinite(value) and value >= 0):
    raise errors.UserError(f'prior_correction must be a finite number >= 0, got {value}')
  return value


def corrected(apply_fn: Callable, weights, strength_: float) -> Callable:
  """`apply_fn` whose outputs have `strength_ * log(weights)` subtracted per class.

  The outputs are logits or log-probabilities ([..., num_classes]); either
  way the argmax is that of the corrected probabilities. Strength 0 returns
  `apply_fn` itself.
  """
  if strength_ == 0:
    return apply_fn
  offset = jnp.asarray(strength_ * np.log(np.asarray(weights, np.float64)), jnp.float32)

  def apply(variables, images, *, train: bool = False):
    return apply_fn(variables, images, train=train) - offset

  return apply


def for_workdir(apply_fn: Callable, config, workdir: str,
                value: float | None = None) -> tuple[Callable, float]:
  """(apply_fn corrected at `strength(config, value)`, that strength), with
  the weights the workdir's training recorded (read only when needed)."""
  strength_ = strength(config, value)
  if strength_:
    apply_fn = corrected(apply_fn, load(workdir, config.model.num_classes), strength_)
  return apply_fn, strength_


def describe(strength_: float) -> str:
  """'none' or e.g. 'strength 0.25'."""
  return 'none' if strength_ == 0 else f'strength {strength_:g}'
