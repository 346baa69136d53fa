"""A tiny workdir trained once per test run and shared by the evaluate and predict tests.

With pytest-xdist every worker is its own process; the first to arrive
trains under a file lock in the run's shared temporary folder and the others
reuse its workdir and its final evaluation (saved beside it as JSON).
"""

import fcntl
import json
import os
import pathlib

import ml_collections
import numpy as np

from configs import carla
from unet_jax import synthetic
from unet_jax import train

NUM_SCENES = 16
SCENE_SIZE = (40, 56)  # not the model's 32x32: evaluation resizes as in training
SUMMARY_FILE = 'final_evaluation.json'


def tiny_config(data_dir: pathlib.Path) -> ml_collections.ConfigDict:
  config = carla.get_config('smoke')  # 32x32, base 4 filters, depth 2, batch 4
  config.data.data_dir = str(data_dir)
  # Frame by frame, so that 16 frames fill every split.
  config.data.split_key = 'name'
  config.data.validation_fraction = 0.25
  config.data.test_fraction = 0.25
  config.num_epochs = 2
  config.log_every_steps = 1
  return config


def _shared_root(tmp_path_factory) -> pathlib.Path:
  base = tmp_path_factory.getbasetemp()
  # Under xdist each worker's base folder sits in one folder of the run.
  return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


def _to_json(summary: dict) -> dict:
  return {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v)
          for k, v in summary.items()}


def _from_json(values: dict) -> dict:
  arrays = ('per_class_iou', 'per_class_accuracy', 'pixel_count', 'confusion_matrix')
  return {k: (np.asarray(v) if k in arrays else v) for k, v in values.items()}


def trained_workdir(tmp_path_factory) -> dict:
  """{'workdir', 'data_dir', 'config', 'final'}; 'final' is training's last evaluation."""
  root = _shared_root(tmp_path_factory) / 'tiny_trained_unet'
  root.mkdir(exist_ok=True)
  data_dir, workdir = root / 'frames', root / 'workdir'
  config = tiny_config(data_dir)
  with open(root / '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / SUMMARY_FILE).exists():
      synthetic.write_scenes(data_dir, NUM_SCENES, seed=3, size=SCENE_SIZE)
      final = train.train_and_evaluate(config, str(workdir))
      (root / SUMMARY_FILE).write_text(json.dumps(_to_json(final)))
    final = _from_json(json.loads((root / SUMMARY_FILE).read_text()))
  return {'workdir': workdir, 'data_dir': data_dir, 'config': config, 'final': final}
