"""The training loop: workdir contents, resume, determinism, devices."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, saved_params, tiny_config
from unet_jax import checkpointing
from unet_jax import evaluate
from unet_jax import evaluation
from unet_jax import input_pipeline
from unet_jax import models
from unet_jax import report
from unet_jax import sharding
from unet_jax import train



def test_workdir_holds_config_checkpoints_events_and_metrics(synthetic_dir, tmp_path):
  config = tiny_config(synthetic_dir)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result['step'] > 0 and 0.0 <= result['pixel_accuracy'] <= 1.0

  saved = checkpointing.load_config(str(tmp_path))
  assert saved.model.to_dict() == config.model.to_dict()
  assert (tmp_path / 'checkpoints' / str(result['step'])).is_dir()
  assert list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))
  lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  train_lines = [line for line in lines if 'train_loss' in line]
  eval_lines = [line for line in lines if 'validation_mean_iou' in line]
  assert train_lines and all({'step', 'epoch', 'train_loss', 'train_pixel_accuracy',
                              'steps_per_second', 'images_per_second'} <= set(line)
                             for line in train_lines)
  assert len(eval_lines) == config.num_epochs  # evaluated every epoch
  assert eval_lines[-1]['validation_mean_iou'] == pytest.approx(result['mean_iou'])

  # Started again on a finished workdir: resumes at the end instead of starting over.
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again['step'] == result['step']
  assert again['mean_iou'] == pytest.approx(result['mean_iou'])


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(synthetic_dir, tmp_path):
  config = tiny_config(synthetic_dir)
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  stopped = train.train_and_evaluate(config, str(tmp_path / 'resumed'), stop_at_step=5)
  assert stopped['stopped'] and stopped['step'] == 5  # mid-epoch, off the checkpoint interval
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  step_a, params_a = saved_params(tmp_path / 'straight')
  step_b, params_b = saved_params(tmp_path / 'resumed')
  assert step_a == step_b
  np.testing.assert_allclose(params_b, params_a, rtol=0, atol=1e-6)


def test_levers_on_train_and_resume_exactly(synthetic_dir, tmp_path):
  # Training crops with scale jitter, rare-class sampling, copy-paste,
  # rare-class windows, the Lovasz term and the weight average (which the checkpoints' model variables are).
  config = tiny_config(synthetic_dir, **{'data.train_crop_size': (16, 24), 'lovasz_weight': 0.5,
                                         'data.rare_boost': 3.0, 'ema_decay': 0.9,
                                         'data.augment.copy_paste': 0.5,
                                         'data.augment.rare_windows': 0.5,
                                         'data.augment.scale_range': (0.7, 1.3)})
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  assert np.isfinite(straight['loss'])
  assert straight['confusion_matrix'].sum() % (32 * 32) == 0  # evaluated on whole frames
  train.train_and_evaluate(config, str(tmp_path / 'resumed'), stop_at_step=5)
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  step_a, params_a = saved_params(tmp_path / 'straight')
  step_b, params_b = saved_params(tmp_path / 'resumed')
  assert step_a == step_b
  np.testing.assert_allclose(params_b, params_a, rtol=0, atol=1e-6)


def test_same_config_and_seed_give_the_same_result(synthetic_dir, tmp_path):
  config = tiny_config(synthetic_dir, num_epochs=1)
  a = train.train_and_evaluate(config, str(tmp_path / 'a'))
  b = train.train_and_evaluate(config, str(tmp_path / 'b'))
  np.testing.assert_array_equal(a['confusion_matrix'], b['confusion_matrix'])
  np.testing.assert_array_equal(saved_params(tmp_path / 'a')[1], saved_params(tmp_path / 'b')[1])
  other_seed = train.train_and_evaluate(tiny_config(synthetic_dir, num_epochs=1, seed=1),
                                        str(tmp_path / 'c'))
  assert not np.array_equal(saved_params(tmp_path / 'c')[1], saved_params(tmp_path / 'a')[1])
  del other_seed


def test_resuming_with_another_model_is_a_clear_error_that_changes_nothing(synthetic_dir,
                                                                           tmp_path):
  train.train_and_evaluate(tiny_config(synthetic_dir, num_epochs=1), str(tmp_path))
  before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob('*'))
  with pytest.raises(ValueError, match=r'model\.base_filters: checkpoint 4, config 8'):
    train.train_and_evaluate(tiny_config(synthetic_dir, **{'model.base_filters': 8}),
                             str(tmp_path))
  after = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob('*'))
  assert after == before


def _train_in_subprocess(data_dir, workdir, num_devices):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}')
  command = [sys.executable, '-m', 'unet_jax.main', '--config=configs/synthetic.py:smoke',
             f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
             '--config.data.synthetic_scenes=0', '--config.data.split_key=name',
             '--config.data.validation_fraction=0.25', '--config.data.test_fraction=0.0',
             '--config.batch_size=8', '--config.num_epochs=2', '--config.log_every_steps=1']
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').open()]
  return [line['train_loss'] for line in lines if 'train_loss' in line]


def test_one_and_eight_devices_reach_the_same_loss_and_parameters(synthetic_dir, tmp_path):
  losses_1 = _train_in_subprocess(synthetic_dir, tmp_path / 'one', 1)
  losses_8 = _train_in_subprocess(synthetic_dir, tmp_path / 'eight', 8)
  assert len(losses_1) == len(losses_8) >= 4
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-4)
  np.testing.assert_allclose(saved_params(tmp_path / 'eight')[1], saved_params(tmp_path / 'one')[1],
                             atol=1e-4)


def test_a_weight_averaged_run_evaluates_and_serves_its_average(synthetic_dir, tmp_path):
  config = tiny_config(synthetic_dir, ema_decay=0.8, num_epochs=3)
  final = train.train_and_evaluate(config, str(tmp_path))
  restored_config, variables, _ = checkpointing.restore_model(str(tmp_path), 'latest')
  # restore_model gives the average, not the last weights ...
  manager = checkpointing.create_manager(str(tmp_path), restored_config, read_only=True)
  raw = manager.restore(manager.latest_step())['state']
  manager.close()
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])
  np.testing.assert_array_equal(flat(variables), flat(raw['ema']))
  assert not np.allclose(flat(variables['params']), flat(raw['params']), atol=1e-4)
  # ... and the training's evaluation scored that average.
  mesh = sharding.create_mesh()
  data = input_pipeline.create_datasets(restored_config, mesh)[config.eval_split]
  model = models.unet_from_config(restored_config.model)
  again = evaluation.evaluate(evaluation.compile_eval_step(restored_config, mesh, model),
                              variables, data)
  np.testing.assert_array_equal(again['confusion_matrix'], final['confusion_matrix'])
  # Turning the average on or off for a workdir is refused by name.
  with pytest.raises(ValueError, match=r'ema_decay: checkpoint 0\.8, config 0\.0'):
    train.train_and_evaluate(tiny_config(synthetic_dir, num_epochs=4), str(tmp_path))


def test_a_weight_averaged_run_also_scores_its_optimizer_weights(synthetic_dir, tmp_path):
  averaged_dir, plain_dir = tmp_path / 'averaged', tmp_path / 'plain'
  final = train.train_and_evaluate(tiny_config(synthetic_dir, ema_decay=0.8, num_epochs=3),
                                   str(averaged_dir))
  train.train_and_evaluate(tiny_config(synthetic_dir, num_epochs=3), str(plain_dir))
  # The average never feeds back: the optimizer's weights are those of the same
  # run without an average, so one run measures what the average adds.
  config, weights, _ = checkpointing.restore_model(str(averaged_dir), 'latest',
                                                   weight_average=False)
  _, plain, _ = checkpointing.restore_model(str(plain_dir), 'latest')
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])
  np.testing.assert_allclose(flat(weights), flat(plain), rtol=0, atol=1e-6)
  _, average, _ = checkpointing.restore_model(str(averaged_dir), 'latest')
  assert not np.allclose(flat(weights['params']), flat(average['params']), atol=1e-4)

  plain_flags = dict(checkpoint='latest', eval_size='model', tta_flip=False, tta_scales=(1.0,))
  summary, out_dir = evaluate.evaluate_workdir(str(averaged_dir), num_images=0, **plain_flags)
  np.testing.assert_array_equal(summary['confusion_matrix'], final['confusion_matrix'])
  assert summary['weights'] == 'average' and out_dir.name == f'validation-{summary["step"]}'
  summary, out_dir = evaluate.evaluate_workdir(str(averaged_dir), num_images=0,
                                               weight_average=False, **plain_flags)
  mesh = sharding.create_mesh()
  data = input_pipeline.create_datasets(config, mesh)[config.eval_split]
  model = models.unet_from_config(config.model)
  direct = evaluation.evaluate(evaluation.compile_eval_step(config, mesh, model), weights, data)
  np.testing.assert_array_equal(summary['confusion_matrix'], direct['confusion_matrix'])
  assert out_dir.name == f'validation-{summary["step"]}-no_average'
  record = json.loads((out_dir / 'metrics.json').read_text())
  assert record['weights'] == report.AVERAGE_LEFT_OUT
  assert "not the run's moving average" in (out_dir / 'report.md').read_text()
  # A run without an average has only the optimizer's weights; the flag changes nothing.
  summary, out_dir = evaluate.evaluate_workdir(str(plain_dir), num_images=0,
                                               weight_average=False, **plain_flags)
  assert summary['weights'] == 'optimizer' and out_dir.name == f'validation-{summary["step"]}'
