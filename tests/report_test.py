"""The evaluation report's figures, by hand."""

import json

import numpy as np
import pytest

from unet_jax import metrics
from unet_jax import report


def test_the_recording_spread_by_hand():
  record = {'per_recording': [
      {'recording': '000', 'mean_iou': 0.2}, {'recording': '001', 'mean_iou': 0.4},
      {'recording': '002', 'mean_iou': None}, {'recording': '003', 'mean_iou': 0.3}]}
  spread = report.recording_spread(record)
  # Mean of 0.2, 0.4, 0.3 is 0.3; deviations -0.1, 0.1, 0: sample variance 0.02 / 2.
  assert spread['count'] == 3
  assert spread['mean'] == pytest.approx(0.3)
  assert spread['std'] == pytest.approx(0.1)
  assert spread['lowest'] == (0.2, '000') and spread['highest'] == (0.4, '001')
  assert report.recording_spread({'per_recording': [{'recording': '7', 'mean_iou': 0.5}]})[
      'std'] is None
  assert report.recording_spread({}) is None


def test_the_record_and_the_markdown_of_a_confusion_matrix_by_hand():
  # Rows are the truth: road 6 pixels (5 right, 1 called car), car 3 (2 right,
  # 1 called road), sign none at all.
  confusion = np.array([[5, 1, 0], [1, 2, 0], [0, 0, 0]])
  summary = dict(metrics.summarize(confusion), loss=0.5, confusion_matrix=confusion)
  record = report.metrics_record(summary, split='validation', step=12, workdir='runs/x',
                                 num_examples=2, data_dir=None, class_names=['road', 'car', 'sign'])
  assert record['checkpoint_step'] == 12 and record['class_names'] == ['road', 'car', 'sign']
  assert record['pixel_accuracy'] == pytest.approx(7 / 9)
  by_name = {c['name']: c for c in record['per_class']}
  assert by_name['road']['iou'] == pytest.approx(5 / 7)  # 5 / (6 + 6 - 5)
  assert by_name['car']['iou'] == pytest.approx(2 / 4)  # 2 / (3 + 3 - 2)
  assert by_name['sign']['iou'] is None  # JSON has no NaN
  assert record['mean_iou'] == pytest.approx((5 / 7 + 2 / 4) / 2)
  json.dumps(record, allow_nan=False)

  text = report.report_markdown(record, has_examples=False)
  rows = [line for line in text.split('## Per class')[1].split('## Where')[0].splitlines()
          if line.startswith('| ') and not line.startswith('| class')]
  # Most frequent first; a class in neither truth nor prediction is left out.
  assert rows == ['| road | 6 | 66.67% | 0.7143 | 0.8333 |',
                  '| car | 3 | 33.33% | 0.5000 | 0.6667 |']
  errors = text.split('## Where the errors go')[1]
  assert '| car | 0.6667 | 0.6667 | 1.00 | road 33.3% | road 33.3% |' in errors
  assert 'examples.png' not in text and '![confusion matrix](confusion.png)' in text
