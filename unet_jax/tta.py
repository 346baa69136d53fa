"""Test-time augmentation: the model over several views of each image, averaged.

`tta_apply(apply_fn, flip=..., scales=...)` wraps a model's apply function
(`variables, images, *, train` -> logits) into one with the same signature
that runs the model on every view (each scale, and its mirror image with
`flip`), maps each view's class probabilities back onto the input's pixels
(un-mirrored, resized bilinearly) and returns the log of their mean: scores
whose argmax is the prediction and whose softmax is the averaged
probabilities. A single view returns the model's logits untouched, so
identity-only augmentation is plain prediction exactly.

Scales are relative to the input size, or to `model_size` when given: a
model trained at 96x128 can then be scored on whole frames at 480x640 (each
view resized to 96x128 times the scale, predictions resized back).
evaluate and predict take `--tta_flip` and `--tta_scales=1.0,0.75,1.25`;
without them they use the training config's `inference.tta_flip` and
`inference.tta_scales` (`settings`), and a workdir from before those fields
the model alone.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from unet_jax import errors


def parse_scales(text: str | Sequence[float]) -> tuple[float, ...]:
  """'1.0,0.75,1.25' (or a sequence) -> (1.0, 0.75, 1.25); each scale > 0."""
  parts = text.split(',') if isinstance(text, str) else list(text)
  try:
    scales = tuple(float(p) for p in parts if str(p).strip())
  except ValueError as error:
    raise ValueError(f'tta scales must be numbers separated by commas, got {text!r}') from error
  if not scales or min(scales) <= 0:
    raise ValueError(f'tta scales must be positive numbers, at least one, got {text!r}')
  return scales


def view_size(size: Sequence[int], scale: float, multiple: int) -> tuple[int, int]:
  """size * scale, each side rounded (halves up) to the nearest positive multiple of `multiple`."""
  return tuple(max(multiple, multiple * int(n * scale / multiple + 0.5)) for n in size)


def tta_apply(apply_fn: Callable, *, flip: bool = False, scales: Sequence[float] = (1.0,),
              multiple: int = 1, padding: str = 'SAME',
              model_size: Sequence[int] | None = None) -> Callable:
  """The apply function over the views (see the module docstring).

  Args:
    apply_fn: `(variables, images, train=False)` -> logits [B, h, w, C].
    flip: add the horizontal mirror image of every scale.
    scales: view sizes relative to the input (or to model_size).
    multiple: view sides are rounded to multiples of this (2**depth for a U-Net).
    padding: the model's; with 'VALID' the output is smaller than the input
      and only scale 1 (with or without flip) is possible.
    model_size: (height, width) the scales are relative to; None: the input's.
  """
  scales = tuple(float(s) for s in scales)
  if padding != 'SAME' and (scales != (1.0,) or model_size is not None):
    raise ValueError('test-time scales need a SAME-padded model (a VALID U-Net predicts a '
                     f'smaller centre); got scales {scales} with padding {padding!r}')
  views = [(scale, mirrored) for scale in scales for mirrored in ((False, True) if flip else
                                                                  (False,))]

  def apply(variables, images, *, train: bool = False):
    del train  # views are an evaluation-time device
    height, width = images.shape[1:3]
    base = tuple(model_size) if model_size is not None else (height, width)
    outputs = []
    for scale, mirrored in views:
      size = base if scale == 1.0 else view_size(base, scale, multiple)
      view = images if size == (height, width) else jax.image.resize(
          images, (images.shape[0], *size, images.shape[3]), 'linear')
      if mirrored:
        view = view[:, :, ::-1]
      logits = apply_fn(variables, view, train=False)
      if mirrored:
        logits = logits[:, :, ::-1]
      outputs.append(logits)
    if len(outputs) == 1 and (padding != 'SAME' or outputs[0].shape[1:3] == (height, width)):
      return outputs[0]
    total = 0.0
    for logits in outputs:
      probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      out_size = (height, width) if padding == 'SAME' else logits.shape[1:3]
      if probabilities.shape[1:3] != out_size:
        probabilities = jax.image.resize(
            probabilities, (probabilities.shape[0], *out_size, probabilities.shape[3]), 'linear')
      total = total + probabilities
    return jnp.log(total / len(outputs))

  return apply


def settings(config, flip: bool | None = None, scales=None) -> tuple[bool, tuple[float, ...]]:
  """(flip, scales) to use: each as given, else the config's `inference` field,
  else none (flip off, scale 1.0)."""
  inference = config.get('inference') or {}
  if flip is None:
    flip = inference.get('tta_flip', False)
  if scales is None:
    scales = inference.get('tta_scales', (1.0,))
  try:
    return bool(flip), parse_scales(scales)
  except ValueError as error:
    raise errors.UserError(str(error)) from None


def describe(flip: bool, scales: Sequence[float]) -> str:
  """'none', or e.g. 'flip, scales 0.5,0.75,1,1.25'."""
  scales = tuple(scales)
  if not flip and scales == (1.0,):
    return 'none'
  parts = (['flip'] if flip else []) + (
      [] if scales == (1.0,) else ['scales ' + ','.join(f'{s:g}' for s in scales)])
  return ', '.join(parts)


def from_flags(model, flip: bool, scales, model_size=None) -> Callable:
  """`tta_apply` of a models.UNet with its rounding and padding."""
  return tta_apply(model.apply, flip=flip, scales=parse_scales(scales), multiple=2**model.depth,
                   padding=model.padding, model_size=model_size)
