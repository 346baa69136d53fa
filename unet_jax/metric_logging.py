"""What a person watches during training: TensorBoard events, metrics.jsonl,
a progress bar on a terminal and plain log lines elsewhere.

Only process 0 writes; the others get a writer that does nothing.
"""

import json
import math
import pathlib
import sys

from absl import logging
import numpy as np
import tensorboardX
import tqdm

from unet_jax import classes
from unet_jax import console

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
# TensorBoard events reach the disk at least this often (and at close). A
# flush per write fsyncs the event file every log step, which can stall a
# GPU's short steps.
TENSORBOARD_FLUSH_SECONDS = 15


class MetricWriter:
  """Scalars to TensorBoard (tensorboardX, no TensorFlow) and metrics.jsonl."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    self._enabled = enabled
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    self._jsonl = workdir / METRICS_FILE
    if resume_step is not None and self._jsonl.exists():
      _drop_lines_after(self._jsonl, resume_step)
    self._summary = tensorboardX.SummaryWriter(str(workdir / TENSORBOARD_DIR),
                                               flush_secs=TENSORBOARD_FLUSH_SECONDS)

  def write(self, step: int, scalars: dict, echo: bool = True) -> None:
    """Appends to metrics.jsonl and TensorBoard; the line goes to the console
    too if `echo` (else to the log file only)."""
    if not self._enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    with self._jsonl.open('a') as f:
      f.write(json.dumps({'step': int(step), **values}) + '\n')
    for name, value in values.items():
      self._summary.add_scalar(name, value, step)
    shown = ', '.join(f'{k}={v:.4g}' for k, v in values.items() if '/' not in k)
    logging.info('[%d] %s', step, shown, extra=None if echo else console.FILE_ONLY)

  def close(self) -> None:
    if self._enabled:
      self._summary.close()


def _drop_lines_after(path: pathlib.Path, step: int) -> None:
  """A resumed run redoes the steps after its checkpoint: forget their lines."""
  kept = [line for line in path.read_text().splitlines()
          if line.strip() and json.loads(line)['step'] <= step]
  path.write_text(''.join(line + '\n' for line in kept))


class Progress:
  """A tqdm bar when stderr is a terminal; nothing otherwise (log lines suffice)."""

  def __init__(self, description: str, total: int, initial: int = 0, enabled: bool = True):
    self._bar = None
    if enabled and sys.stderr.isatty():
      self._bar = tqdm.tqdm(total=total, initial=initial, desc=description, leave=False,
                            dynamic_ncols=True)

  def update(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def set_postfix(self, **values) -> None:
    if self._bar is not None:
      self._bar.set_postfix({k: f'{v:.4g}' for k, v in values.items()}, refresh=False)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def per_class_table(summary: dict) -> str:
  """Per-class IoU and accuracy, most frequent class first, as aligned text."""
  counts = np.asarray(summary['pixel_count'])
  total = max(int(counts.sum()), 1)
  lines = [f'{"class":<13} {"pixels %":>8} {"IoU":>7} {"accuracy":>8}']
  for index in np.argsort(-counts, kind='stable'):
    iou, accuracy = summary['per_class_iou'][index], summary['per_class_accuracy'][index]
    if counts[index] == 0 and math.isnan(iou):
      continue
    lines.append(f'{classes.class_name(int(index)):<13} {100 * counts[index] / total:8.3f} '
                 f'{_fmt(iou):>7} {_fmt(accuracy):>8}')
  lines.append(f'pixel accuracy {summary["pixel_accuracy"]:.4f}, mean IoU '
               f'{summary["mean_iou"]:.4f}, mean class accuracy '
               f'{summary["mean_class_accuracy"]:.4f}')
  return '\n'.join(lines)


def _fmt(value: float) -> str:
  return '-' if math.isnan(value) else f'{value:.4f}'
