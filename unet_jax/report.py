"""The evaluation report: the scores as JSON and as Markdown a person reads.

`metrics_record` turns `evaluation.evaluate`'s summary (and its
per-recording scores) into JSON-ready values keyed by class name;
`write_report` writes a report folder: metrics.json, report.md (headline
numbers, per-recording table and spread, per-class table, where each
class's errors go), confusion.png and examples.png. unet_jax.evaluate
decides what is scored and where the folder goes.
"""

from collections.abc import Sequence
import json
import math
import pathlib

import numpy as np

from unet_jax import metrics as metrics_lib
from unet_jax import tta
from unet_jax import visualize

# The weights scored of a run that kept a moving average, without it.
AVERAGE_LEFT_OUT = 'optimizer, not the average'


def _number(value: float) -> float | None:
  """JSON has no NaN: a class absent from truth and prediction has no IoU."""
  return None if math.isnan(value) else float(value)


def _per_class(summary: dict, class_names: Sequence[str]) -> list[dict]:
  return [{
      'index': index,
      'name': class_names[index] if index < len(class_names) else f'class{index}',
      'pixel_count': int(summary['pixel_count'][index]),
      'iou': _number(summary['per_class_iou'][index]),
      'accuracy': _number(summary['per_class_accuracy'][index]),
  } for index in range(len(summary['pixel_count']))]


def metrics_record(summary: dict, *, split: str, step: int, workdir: str,
                   num_examples: int, data_dir: str | None,
                   class_names: Sequence[str]) -> dict:
  """The summary as JSON-ready values, per-class numbers keyed by class name;
  with the summary's 'per_recording', the same for each recording."""
  per_class = _per_class(summary, class_names)
  record = {
      'workdir': str(workdir),
      'split': split,
      'data_dir': None if data_dir is None else str(pathlib.Path(data_dir).resolve()),
      'checkpoint_step': int(step),
      'num_examples': int(num_examples),
      'pixel_accuracy': _number(summary['pixel_accuracy']),
      'mean_iou': _number(summary['mean_iou']),
      'mean_class_accuracy': _number(summary['mean_class_accuracy']),
      'loss': _number(summary['loss']),
      'per_class': per_class,
      'class_names': [c['name'] for c in per_class],
      # Rows are the true class, columns the predicted class.
      'confusion_matrix': np.asarray(summary['confusion_matrix']).astype(int).tolist(),
  }
  if 'per_recording' in summary:
    record['per_recording'] = [{
        'recording': recording,
        'num_examples': int(group['num_examples']),
        'pixel_accuracy': _number(group['pixel_accuracy']),
        'mean_iou': _number(group['mean_iou']),
        'mean_class_accuracy': _number(group['mean_class_accuracy']),
        'per_class': _per_class(group, class_names),
        'confusion_matrix': np.asarray(group['confusion_matrix']).astype(int).tolist(),
    } for recording, group in summary['per_recording'].items()]
  return record


def _cell(value: float | None) -> str:
  return '-' if value is None else f'{value:.4f}'


def report_markdown(record: dict, has_examples: bool) -> str:
  """A Markdown report: headline numbers, per-class table by frequency, figures."""
  total = max(sum(c['pixel_count'] for c in record['per_class']), 1)
  rows = sorted(record['per_class'], key=lambda c: -c['pixel_count'])
  lines = [
      f'# Evaluation: {record["split"]}, checkpoint step {record["checkpoint_step"]}',
      '',
      f'Workdir `{record["workdir"]}`, {record["num_examples"]} frames'
      + (f' from `{record["data_dir"]}`.' if record['data_dir'] else '.'),
      '',
  ]
  if 'eval_size' in record:
    (height, width), (model_h, model_w) = record['eval_size'], record['model_size']
    lines += [f'Scored on whole frames at {height}x{width} (the model sees them at '
              f'{model_h}x{model_w}); test-time augmentation: '
              f'{tta.describe(record["tta"]["flip"], record["tta"]["scales"])}.', '']
  if record.get('ensemble'):
    members = ', '.join(f'`{m["workdir"]}` (step {m["step"]})' for m in record['ensemble'])
    lines += [f'Ensemble of {len(record["ensemble"])} models, class probabilities averaged: '
              f'{members}.', '']
  if record.get('prior_correction'):
    lines += [f"Class-weight prior taken out at strength {record['prior_correction']:g} "
              '(`--prior_correction`).', '']
  if record.get('weights') == 'average':
    lines += ["Weights: the run's moving average (`ema_decay`).", '']
  elif record.get('weights') == AVERAGE_LEFT_OUT:
    lines += ["Weights: the optimizer's, not the run's moving average (`--noweight_average`).",
              '']
  lines += [
      '| metric | value |',
      '|---|---|',
      f'| pixel accuracy | {_cell(record["pixel_accuracy"])} |',
      f'| mean IoU | {_cell(record["mean_iou"])} |',
      f'| mean class accuracy | {_cell(record["mean_class_accuracy"])} |',
      f'| loss | {_cell(record["loss"])} |',
      '',
  ]
  lines += _per_recording_lines(record)
  lines += [
      '## Per class, most frequent first',
      '',
      'Classes absent from both the truth and the prediction are left out.',
      '',
      '| class | pixels | share | IoU | accuracy |',
      '|---|---:|---:|---:|---:|',
  ]
  for c in rows:
    if c['pixel_count'] == 0 and c['iou'] is None:
      continue
    lines.append(f'| {c["name"]} | {c["pixel_count"]} | {100 * c["pixel_count"] / total:.2f}% '
                 f'| {_cell(c["iou"])} | {_cell(c["accuracy"])} |')
  lines += _error_lines(record)
  lines += ['', '## Confusion matrix', '',
            'Each row is a true class; the numbers are the percentage of its pixels given '
            'to each predicted class.', '', '![confusion matrix](confusion.png)', '']
  if has_examples:
    lines += ['## Examples', '',
              'Image, ground truth, prediction, and in red where they disagree.', '',
              '![examples](examples.png)', '']
  return '\n'.join(lines)


def _error_lines(record: dict) -> list[str]:
  """The 'where the errors go' table, most frequent class first."""
  names = record['class_names']
  counts = {c['name']: c['pixel_count'] for c in record['per_class']}
  rows = sorted(metrics_lib.error_breakdown(np.asarray(record['confusion_matrix'])),
                key=lambda b: -counts[names[b['index']]])

  def shares(pairs):
    return ', '.join(f'{names[j]} {100 * share:.1f}%' for j, share in pairs) or '-'

  lines = ['', '## Where the errors go', '',
           "Recall: the share of a class's pixels predicted as it; precision: the share of "
           'the pixels predicted as it that are it. Missed pixels: the classes its pixels were '
           'given instead (share of its pixels); its false predictions: the true classes of '
           'the pixels wrongly given to it (share of its predictions).', '',
           '| class | recall | precision | predicted / true pixels | missed pixels went to '
           '| its false predictions were |',
           '|---|---:|---:|---:|---|---|']
  for b in rows:
    ratio = '-' if b['predicted_over_truth'] is None else f'{b["predicted_over_truth"]:.2f}'
    lines.append(f'| {names[b["index"]]} | {_cell(b["recall"])} | {_cell(b["precision"])} '
                 f'| {ratio} | {shares(b["missed_as"])} | {shares(b["mistaken_for"])} |')
  return lines


def recording_spread(record: dict) -> dict | None:
  """Mean IoU across the recordings scored on their own: mean, standard
  deviation (None for one recording), and the lowest and highest with their
  recording; None without per-recording scores."""
  scored = [(r['mean_iou'], r['recording']) for r in record.get('per_recording', ())
            if r['mean_iou'] is not None]
  if not scored:
    return None
  values = np.array([value for value, _ in scored])
  return {'count': len(scored), 'mean': float(values.mean()),
          'std': float(values.std(ddof=1)) if len(scored) > 1 else None,
          'lowest': min(scored), 'highest': max(scored)}


def _per_recording_lines(record: dict) -> list[str]:
  recordings = record.get('per_recording')
  if not recordings:
    return []
  spread = recording_spread(record)
  lines = ['## Per recording', '',
           'Each recording scored on its own (a recording is the first three characters of '
           "a frame's name). Mean IoU counts the classes present in the recording's truth or "
           'prediction.']
  if spread and spread['std'] is not None:
    (low, low_name), (high, high_name) = spread['lowest'], spread['highest']
    lines[-1] += (f' Across the {spread["count"]} recordings: {spread["mean"]:.4f} ± '
                  f'{spread["std"]:.4f}, from {low:.4f} ({low_name}) to {high:.4f} '
                  f'({high_name}).')
  shown = [name for name in record.get('report_classes', ()) if name in record['class_names']]
  lines += ['', '| recording | frames | pixel accuracy | mean IoU |'
            + ''.join(f' {name} IoU |' for name in shown),
            '|---|---:|---:|---:|' + '---:|' * len(shown)]
  for r in recordings:
    iou = {c['name']: c['iou'] for c in r['per_class']}
    lines.append(f'| {r["recording"]} | {r["num_examples"]} | {_cell(r["pixel_accuracy"])} '
                 f'| {_cell(r["mean_iou"])} |' + ''.join(f' {_cell(iou[name])} |'
                                                         for name in shown))
  if shown:
    lines += ['', f'{", ".join(shown)}: the config\'s `data.rare_classes`; "-" where a '
              'recording has the class in neither its truth nor the prediction.']
  return lines + ['']


def write_report(out_dir: pathlib.Path, record: dict, examples: dict) -> None:
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / 'metrics.json').write_text(json.dumps(record, indent=2) + '\n')
  visualize.confusion_figure(out_dir / 'confusion.png', np.asarray(record['confusion_matrix']),
                             class_names=record['class_names'])
  has_examples = bool(examples['images'])
  if has_examples:
    visualize.examples_figure(
        out_dir / 'examples.png', examples['images'], examples['labels'],
        examples['predictions'], scored=examples['scored'], class_names=record['class_names'],
        titles=[f'{record["split"]} #{i}' for i in range(len(examples['images']))])
  (out_dir / 'report.md').write_text(report_markdown(record, has_examples))
