"""Evaluation of a trained workdir: the metrics, the folder mode and the report."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import ml_collections
from PIL import Image
import pytest

from unet_jax import carla_dataset
from unet_jax import carla_files
from unet_jax import checkpointing
from unet_jax import evaluate
from unet_jax import report as report_lib


REPO = pathlib.Path(__file__).resolve().parents[1]



def _copy_split_frames(trained, split: str, destination: pathlib.Path) -> list[str]:
  """Copies the pairs that the builder puts in `split` into a new CARLA folder."""
  config = trained['config']
  pairs, _ = carla_files.list_pairs(trained['data_dir'])
  names = [pair.name for pair in pairs
           if carla_dataset.split_of(pair.name, config.data.split_key,
                                     config.data.validation_fraction,
                                     config.data.test_fraction) == split]
  for sub in (carla_files.IMAGE_DIR, carla_files.MASK_DIR):
    (destination / sub).mkdir(parents=True)
    for name in names:
      shutil.copy(trained['data_dir'] / sub / f'{name}.png', destination / sub / f'{name}.png')
  return names


def test_metrics_equal_those_at_the_end_of_training(trained):
  final = trained['final']
  summary, out_dir = evaluate.evaluate_workdir(str(trained['workdir']), 'validation', 'latest',
                                               num_images=2)
  assert summary['step'] == final['step']
  assert out_dir == trained['workdir'] / 'eval' / f'validation-{final["step"]}'
  np.testing.assert_array_equal(summary['confusion_matrix'], final['confusion_matrix'])
  assert summary['confusion_matrix'].sum() > 0
  for key in ('pixel_accuracy', 'mean_iou', 'mean_class_accuracy', 'loss'):
    assert summary[key] == final[key], key
  np.testing.assert_array_equal(summary['per_class_iou'], final['per_class_iou'])


def test_a_folder_of_the_split_frames_gives_the_split_metrics(trained, tmp_path):
  folder = tmp_path / 'new_frames'
  names = _copy_split_frames(trained, 'validation', folder)
  assert names
  split_summary, _ = evaluate.evaluate_workdir(str(trained['workdir']), 'validation', 'latest',
                                               num_images=1)
  folder_summary, out_dir = evaluate.evaluate_workdir(str(trained['workdir']), 'validation',
                                                      'latest', data_dir=str(folder),
                                                      num_images=1)
  assert out_dir.name == f'folder-new_frames-{split_summary["step"]}'
  np.testing.assert_array_equal(folder_summary['confusion_matrix'],
                                split_summary['confusion_matrix'])
  for key in ('pixel_accuracy', 'mean_iou', 'mean_class_accuracy'):
    assert folder_summary[key] == split_summary[key], key
  # The loss is a float sum, whose order may follow the prepared copy's example order.
  assert folder_summary['loss'] == pytest.approx(split_summary['loss'], rel=1e-6)
  # The prepared copy went into the workdir, not into the person's folder.
  assert not (folder / '.prepared').exists()
  record = json.loads((out_dir / 'metrics.json').read_text())
  assert record['data_dir'] == str(folder.resolve())
  assert record['num_examples'] == len(names)


def test_the_report_holds_every_metric_and_both_figures(trained):
  summary, out_dir = evaluate.evaluate_workdir(str(trained['workdir']), 'test', 'latest',
                                               num_images=3)
  record = json.loads((out_dir / 'metrics.json').read_text())
  assert out_dir.name == f'test-{summary["step"]}'
  assert record['split'] == 'test' and record['checkpoint_step'] == summary['step']
  confusion = np.array(record['confusion_matrix'])
  np.testing.assert_array_equal(confusion, summary['confusion_matrix'])
  assert record['mean_iou'] == pytest.approx(summary['mean_iou'])
  assert record['pixel_accuracy'] == pytest.approx(np.trace(confusion) / confusion.sum())
  by_name = {c['name']: c for c in record['per_class']}
  assert len(by_name) == 23 and 'Road' in by_name
  np.testing.assert_array_equal([c['pixel_count'] for c in record['per_class']],
                                confusion.sum(axis=1))
  road = by_name['Road']
  assert road['accuracy'] == pytest.approx(confusion[7, 7] / confusion[7].sum())

  report = (out_dir / 'report.md').read_text()
  assert '![confusion matrix](confusion.png)' in report and '![examples](examples.png)' in report
  # The per-class table lists the present classes, most frequent first.
  table = [line.split('|')[1].strip() for line in report.splitlines()
           if line.startswith('| ') and line.count('|') == 6][1:]
  present = [c for c in record['per_class'] if c['pixel_count'] or c['iou'] is not None]
  counts = [by_name[name]['pixel_count'] for name in table]
  assert sorted(table) == sorted(c['name'] for c in present)
  assert counts == sorted(counts, reverse=True)
  # Where the errors go: Road's recall is its accuracy, its precision and the
  # largest share of its pixels given to another class come from the matrix.
  errors = report.split('## Where the errors go')[1].split('## Confusion matrix')[0]
  rows = {line.split('|')[1].strip(): [cell.strip() for cell in line.split('|')[2:-1]]
          for line in errors.splitlines() if line.startswith('| ') and line.count('|') == 7}
  assert set(rows) - {'class'} == {c['name'] for c in present}
  recall, precision, ratio, missed, _ = rows['Road']
  assert recall == f'{road["accuracy"]:.4f}'
  assert precision == f'{confusion[7, 7] / confusion[:, 7].sum():.4f}'
  assert ratio == f'{confusion[:, 7].sum() / confusion[7].sum():.2f}'
  others = np.delete(confusion[7], 7)
  assert others.max() > 0  # the tiny model misses some road
  assert missed.startswith(f'{record["class_names"][np.delete(np.arange(23), 7)[others.argmax()]]} '
                           f'{100 * others.max() / confusion[7].sum():.1f}%')

  with Image.open(out_dir / 'examples.png') as examples, \
       Image.open(out_dir / 'confusion.png') as heat_map:
    assert examples.format == heat_map.format == 'PNG'
    assert examples.height > 200  # three rows of frames


def test_each_way_of_scoring_keeps_its_own_report(trained):
  workdir = str(trained['workdir'])
  plain, plain_dir = evaluate.evaluate_workdir(workdir, 'validation', 'latest', num_images=0)
  flipped, flipped_dir = evaluate.evaluate_workdir(workdir, 'validation', 'latest', num_images=0,
                                                   tta_flip=True)
  assert plain_dir.name == f'validation-{plain["step"]}'
  assert flipped_dir.name == f'validation-{plain["step"]}-tta_flip'
  # The second scoring left the first one's report as it was.
  for summary, out_dir in ((plain, plain_dir), (flipped, flipped_dir)):
    record = json.loads((out_dir / 'metrics.json').read_text())
    assert record['tta']['flip'] == summary['tta']['flip']
    np.testing.assert_array_equal(record['confusion_matrix'], summary['confusion_matrix'])
  assert plain['tta']['flip'] is False and flipped['tta']['flip'] is True


def test_the_report_folder_names_what_the_flags_changed():
  config = ml_collections.ConfigDict({
      'data': {'image_size': (96, 128)},
      'inference': {'eval_size': (480, 640), 'tta_flip': True, 'tta_scales': (1.0, 1.25),
                    'prior_correction': 0.0}})
  def name(size=(480, 640), flip=True, scales=(1.0, 1.25), prior=0.0, weights='average'):
    return evaluate.report_folder_name(config, 'validation', 7, size, flip, scales, prior, weights)
  assert name() == 'validation-7'
  assert name(size=(96, 128)) == 'validation-7-96x128'
  assert name(flip=False, scales=(1.0,)) == 'validation-7-notta'
  assert name(flip=False) == 'validation-7-tta_1,1.25'
  assert name(scales=(0.75, 1.0)) == 'validation-7-tta_flip_0.75,1'
  assert name(scales=(1.0,)) == 'validation-7-tta_flip'
  assert name(prior=0.25) == 'validation-7-prior0.25'
  assert (name(size=(96, 128), flip=False, scales=(1.0,), prior=0.5,
               weights=report_lib.AVERAGE_LEFT_OUT)
          == 'validation-7-96x128-notta-prior0.5-no_average')
  config.inference.prior_correction = 0.25  # the config's own strength gets no tag
  assert name(prior=0.25) == 'validation-7' and name() == 'validation-7-prior0'


def test_unknown_split_and_checkpoint_are_clear_errors(trained):
  with pytest.raises(ValueError, match="split must be one of"):
    evaluate.evaluate_workdir(str(trained['workdir']), 'valid', 'latest')
  with pytest.raises(checkpointing.WorkdirError, match='no checkpoint at step 12345'):
    evaluate.evaluate_workdir(str(trained['workdir']), 'validation', '12345')


def test_the_command_on_two_devices_gives_the_same_metrics(trained, tmp_path):
  workdir = tmp_path / 'copy'
  shutil.copytree(trained['workdir'], workdir)
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  result = subprocess.run(
      [sys.executable, '-m', 'unet_jax.evaluate', f'--workdir={workdir}', '--split=validation',
       '--checkpoint=latest', '--num_images=2'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  step = trained['final']['step']
  record = json.loads((workdir / 'eval' / f'validation-{step}' / 'metrics.json').read_text())
  np.testing.assert_array_equal(record['confusion_matrix'], trained['final']['confusion_matrix'])
  assert f'mean IoU {trained["final"]["mean_iou"]:.4f}' in result.stdout


def test_each_recording_is_scored_on_its_own(trained, tmp_path):
  summary, out_dir = evaluate.evaluate_workdir(str(trained['workdir']), 'validation', 'latest',
                                               num_images=1)
  folder = tmp_path / 'all_validation'
  names = _copy_split_frames(trained, 'validation', folder)
  expected = {}
  for name in names:
    expected.setdefault(name[:3], []).append(name)
  per_recording = summary['per_recording']
  assert sorted(per_recording) == sorted(expected) and len(expected) >= 2
  for recording, group in per_recording.items():
    assert group['num_examples'] == len(expected[recording])
  # The recordings' matrices add up to the split's, which is training's own.
  np.testing.assert_array_equal(sum(g['confusion_matrix'] for g in per_recording.values()),
                                trained['final']['confusion_matrix'])
  np.testing.assert_array_equal(summary['confusion_matrix'], trained['final']['confusion_matrix'])

  # A recording's row is what a folder of that recording's frames alone scores.
  recording = max(expected, key=lambda r: len(expected[r]))
  alone = tmp_path / f'recording_{recording}'
  for sub in (carla_files.IMAGE_DIR, carla_files.MASK_DIR):
    (alone / sub).mkdir(parents=True)
    for name in expected[recording]:
      shutil.copy(folder / sub / f'{name}.png', alone / sub / f'{name}.png')
  folder_summary, _ = evaluate.evaluate_workdir(str(trained['workdir']), 'validation', 'latest',
                                                data_dir=str(alone), num_images=0)
  np.testing.assert_array_equal(per_recording[recording]['confusion_matrix'],
                                folder_summary['confusion_matrix'])
  assert per_recording[recording]['mean_iou'] == folder_summary['mean_iou']
  assert list(folder_summary['per_recording']) == [recording]

  record = json.loads((out_dir / 'metrics.json').read_text())
  rows = {r['recording']: r for r in record['per_recording']}
  assert sorted(rows) == sorted(expected)
  for recording, row in rows.items():
    np.testing.assert_array_equal(row['confusion_matrix'],
                                  per_recording[recording]['confusion_matrix'])
    assert row['mean_iou'] == pytest.approx(per_recording[recording]['mean_iou'])
  report = (out_dir / 'report.md').read_text()
  assert '## Per recording' in report
  table = [line.split('|')[1].strip() for line in report.splitlines()
           if line.startswith('| ') and line.split('|')[1].strip() in expected]
  assert sorted(table) == sorted(expected)
  spread = report_lib.recording_spread(record)
  values = [r['mean_iou'] for r in record['per_recording'] if r['mean_iou'] is not None]
  assert spread['mean'] == pytest.approx(np.mean(values))
  assert f'{spread["mean"]:.4f} ± {np.std(values, ddof=1):.4f}' in report
