"""scripts/compare_recipes.py: recipes with overrides, resumable runs, the table."""

import importlib.util
import json
import math
import os
import subprocess
import sys

from absl import app
import pytest

from conftest import REPO
from unet_jax import carla_dataset

_spec = importlib.util.spec_from_file_location('compare_recipes',
                                               REPO / 'scripts' / 'compare_recipes.py')
compare_recipes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_recipes)

CARLA = str(REPO / 'configs' / 'carla.py')


def test_recipes_are_named_configs_with_their_own_overrides():
  recipes = compare_recipes.parse_recipes(
      [CARLA, f'{CARLA}:smoke'],
      ['weighted=' + CARLA + ';class_weighting=median;data.image_size=(64, 96)'])
  assert recipes == {'carla': (CARLA, []), 'carla-smoke': (f'{CARLA}:smoke', []),
                     'weighted': (CARLA, ['class_weighting=median',
                                          'data.image_size=(64, 96)'])}
  with pytest.raises(app.UsageError, match='expected name=file.py'):
    compare_recipes.parse_recipes([], ['no-config-here'])


def test_overrides_apply_in_order_and_the_seed_and_split_are_set():
  config = compare_recipes.build_config(
      CARLA, ['batch_size=4', 'data.augment.scale_range=(1.0, 2.0)', 'batch_size=16',
              'lr_schedule=constant'], seed=7, split='test')
  assert config.batch_size == 16 and config.lr_schedule == 'constant'
  assert tuple(config.data.augment.scale_range) == (1.0, 2.0)
  assert config.seed == 7 and config.eval_split == 'test'
  with pytest.raises(KeyError, match='no field model.nonexistent'):
    compare_recipes.build_config(CARLA, ['model.nonexistent=1'], seed=0, split='validation')
  # {seed} is each run's own seed: a fine-tune starts from the model of its seed.
  config = compare_recipes.build_config(CARLA, ['init_from=runs/base/seed{seed}'], seed=2,
                                        split='validation')
  assert config.init_from == 'runs/base/seed2'


def test_a_finished_run_is_read_back_not_trained_again(tmp_path):
  finished = {'recipe': 'r', 'seed': 3, 'mean_iou': 0.5}
  (tmp_path / 'result.json').write_text(json.dumps(finished))
  # A config path that does not exist: training would fail at once.
  assert compare_recipes.run_one('r', 'missing.py', [], 3, 'validation', tmp_path) == finished


def _result(recipe, pixel_accuracy, mean_iou, pedestrian):
  per_class = [0.5] * 23
  per_class[compare_recipes.classes.CLASS_NAMES.index('Pedestrian')] = pedestrian
  return {'recipe': recipe, 'pixel_accuracy': pixel_accuracy, 'mean_iou': mean_iou,
          'per_class_iou': per_class, 'wall_seconds': 10.0, 'images_per_second': 5.0}


def test_table_gives_mean_and_spread_over_seeds_and_skips_absent_classes():
  results = [_result('a', 0.8, 0.2, 0.1), _result('a', 0.9, 0.4, math.nan),
             _result('b', 0.7, 0.3, math.nan)]
  rows = compare_recipes.table(results, class_names=('Pedestrian',)).splitlines()
  assert rows[0] == ('| recipe | seeds | pixel acc | mean IoU | Pedestrian | wall s | images/s |')
  # mean ± sample standard deviation; a class absent from a run's split is left out.
  assert rows[2] == '| a | 2 | 0.850 ± 0.071 | 0.300 ± 0.141 | 0.100 | 10 | 5.0 |'
  assert rows[3] == '| b | 1 | 0.700 | 0.300 | - | 10 | 5.0 |'


def _paired(recipe, seed, per_recording, machine='AMD EPYC, 2 cores'):
  return {'recipe': recipe, 'seed': seed, 'per_recording_mean_iou': per_recording,
          'machine': machine}


def test_the_paired_table_by_hand():
  results = [
      _paired('base', 0, {'000': 0.20, '001': 0.30, '007': 0.40}),
      _paired('base', 1, {'000': 0.22, '001': 0.28, '007': 0.40}),
      _paired('new', 0, {'000': 0.25, '001': 0.29, '007': 0.44}),
      _paired('new', 1, {'000': 0.25, '001': 0.31, '007': 0.42}),
      _paired('new', 2, {'000': 0.90, '001': 0.90, '007': 0.90}),  # base lacks seed 2
      _paired('one_seed', 1, {'000': 0.20, '001': 0.30, '009': 0.50},
              machine='Intel Xeon, 2 cores'),
      _paired('older', 0, {'000': 0.20, '001': 0.30, '007': 0.40}, machine=None),
      {'recipe': 'unscored', 'seed': 0},  # no per-recording scores: left out
  ]
  rows = compare_recipes.paired_table(results, 'base').splitlines()
  # new against base on seeds 0 and 1: 000 (+0.05 +0.03)/2 = +0.04, 001 (-0.01 +0.03)/2 =
  # +0.01, 007 (+0.04 +0.02)/2 = +0.03; mean +0.0267, sample std 0.0153.
  assert rows[2] == ('| new | 2 | 3 of 3 | +0.027 ± 0.015 | +0.010 (001) | +0.040 (000) '
                     '| yes |')
  # one_seed on seed 1 and the recordings both hold: 000 -0.02, 001 +0.02; trained on
  # another machine than the reference's seed 1.
  assert rows[3] == ('| one_seed | 1 | 1 of 2 | +0.000 ± 0.028 | -0.020 (000) | +0.020 (001) '
                     '| no |')
  # A run from before the machine was recorded: equal scores, an unknown machine.
  assert rows[4] == ('| older | 1 | 0 of 3 | +0.000 ± 0.000 | +0.000 (000) | +0.000 (000) '
                     '| unknown |')
  assert len(rows) == 5
  assert compare_recipes.paired_table(results, 'unscored') == ''


def _tiny_scenes(tmp_path) -> list[str]:
  """Overrides for 12 synthetic scenes in tmp_path, a quarter of them validation."""
  return [f'data.data_dir={tmp_path / "scenes"}', 'data.synthetic_scenes=12',
          "data.split_key='name'", 'data.validation_fraction=0.25',
          'data.test_fraction=0.0', f'data.prepared_dir={tmp_path / "prepared"}']


def test_eval_size_scores_whole_frames_at_that_size(tmp_path):
  overrides = _tiny_scenes(tmp_path)
  plain = compare_recipes.run_one('tiny', f'{CARLA}:smoke', overrides, 0, 'validation',
                                  tmp_path / 'run', eval_size=[48, 64])
  log = (tmp_path / 'run' / 'metrics.jsonl').read_text()
  # The finished run scored again with test-time augmentation: no training.
  result = compare_recipes.run_one('tiny', f'{CARLA}:smoke', overrides, 0, 'validation',
                                   tmp_path / 'run', eval_size=[48, 64], flip=True)
  assert (tmp_path / 'run' / 'metrics.jsonl').read_text() == log
  assert (tmp_path / 'run' / 'result_tta_flip_1.json').exists()
  assert result['image_size'] == [32, 32] and result['eval_size'] == [48, 64]
  assert result['tta'] == {'flip': True, 'scales': [1.0]}
  assert plain['tta'] == {'flip': False, 'scales': [1.0]}
  # The machine that trained, kept when the run is scored again.
  assert plain['machine'] == compare_recipes.training_machine()
  assert plain['machine'].endswith(f'{os.cpu_count()} cores') and result['machine'] == plain['machine']
  assert result['wall_seconds'] == plain['wall_seconds']
  assert json.loads((tmp_path / 'run' / 'result.json').read_text())['mean_iou'] == plain['mean_iou']
  config = compare_recipes.build_config(f'{CARLA}:smoke', overrides, 0, 'validation')
  summary = compare_recipes.evaluate_at(config, str(tmp_path / 'run'), (48, 64))
  names = [f.stem for f in (tmp_path / 'scenes' / 'CameraRGB').glob('*.png')]
  frames = sum(carla_dataset.split_of(n, 'name', 0.25, 0.0) == 'validation' for n in names)
  assert frames >= 1 and summary['confusion_matrix'].sum() == frames * 48 * 64
  assert 0 <= summary['mean_iou'] <= 1
  # Each validation recording scored on its own, as evaluate's report gives it.
  recordings = {carla_dataset.group_key(n, 'recording') for n in names
                if carla_dataset.split_of(n, 'name', 0.25, 0.0) == 'validation'}
  assert set(plain['per_recording_mean_iou']) == recordings
  assert plain['per_recording_mean_iou'] == {
      name: pytest.approx(float(group['mean_iou']))
      for name, group in summary['per_recording'].items()}
  # Scored again with the class-weight prior taken out, into a file of its own. A
  # run trained before training recorded its weights gets the same ones recorded.
  weights_file = tmp_path / 'run' / 'class_weights.json'
  recorded = weights_file.read_text()
  weights_file.unlink()
  corrected = compare_recipes.run_one('tiny', f'{CARLA}:smoke', overrides, 0, 'validation',
                                      tmp_path / 'run', eval_size=[48, 64], prior=0.5)
  assert weights_file.read_text() == recorded
  assert (tmp_path / 'run' / 'metrics.jsonl').read_text() == log
  assert corrected['prior_correction'] == 0.5 and plain['prior_correction'] == 0.0
  written = json.loads((tmp_path / 'run' / 'result_prior0.5.json').read_text())
  assert written['prior_correction'] == 0.5 and written['mean_iou'] == corrected['mean_iou']


def test_a_recipes_seeds_are_scored_as_one_model(tmp_path):
  overrides = _tiny_scenes(tmp_path)
  runs = [compare_recipes.run_one('tiny', f'{CARLA}:smoke', overrides, seed, 'validation',
                                  tmp_path / 'tiny' / f'seed{seed}', eval_size=[48, 64],
                                  flip=True)
          for seed in (0, 1)]
  workdirs = [tmp_path / 'tiny' / 'seed0', tmp_path / 'tiny' / 'seed1']
  assert compare_recipes.run_ensemble(runs, workdirs, 'validation', score=False) is None
  result = compare_recipes.run_ensemble(runs, workdirs, 'validation')
  written = tmp_path / 'tiny' / 'ensemble_seeds0,1_result_tta_flip_1.json'
  # Read back, not scored again (compared as JSON: an absent class's IoU is NaN).
  assert written.read_text() == json.dumps(result, indent=2)
  again = compare_recipes.run_ensemble(runs, workdirs, 'validation', score=False)
  assert json.dumps(again) == json.dumps(result)
  assert result['recipe'] == 'tiny, seeds 0,1 averaged' and result['seeds'] == [0, 1]
  assert result['eval_size'] == [48, 64] and result['tta'] == {'flip': True, 'scales': [1.0]}
  assert result['wall_seconds'] == pytest.approx(sum(r['wall_seconds'] for r in runs))
  assert set(result['per_recording_mean_iou']) == set(runs[0]['per_recording_mean_iou'])
  # The same as evaluate's scoring of the two workdirs together, with the runs' settings.
  summary, out_dir = compare_recipes.evaluate.evaluate_workdir(
      str(workdirs[0]), 'validation', 'latest', num_images=0, tta_flip=True, eval_size=(48, 64),
      ensemble_workdirs=[str(workdirs[1])])
  assert result['mean_iou'] == pytest.approx(summary['mean_iou'])
  assert [m['workdir'] for m in summary['ensemble']] == [str(w) for w in workdirs]
  assert '-ensemble2_' in out_dir.name


def test_each_scoring_has_its_own_result_file():
  assert compare_recipes.result_name() == 'result.json'
  assert compare_recipes.result_name(True, ['0.75', '1.0', '1.25']) == (
      'result_tta_flip_0.75,1,1.25.json')
  assert compare_recipes.result_name(prior=0.25) == 'result_prior0.25.json'
  assert compare_recipes.result_name(True, (1.0,), 0.25) == 'result_tta_flip_1_prior0.25.json'


def test_a_stopped_run_is_not_scored_and_the_same_call_resumes_it(tmp_path, monkeypatch):
  overrides = _tiny_scenes(tmp_path)
  full = compare_recipes.train.train_and_evaluate
  # What a SIGTERM does mid-run: a checkpoint, then a summary marked stopped.
  monkeypatch.setattr(compare_recipes.train, 'train_and_evaluate',
                      lambda config, workdir: full(config, workdir, stop_at_step=1))
  with pytest.raises(SystemExit, match='stopped at step 1 .* resumes it'):
    compare_recipes.run_one('tiny', f'{CARLA}:smoke', overrides, 0, 'validation',
                            tmp_path / 'run', eval_size=[48, 64])
  assert not list((tmp_path / 'run').glob('result*.json'))
  stopped_seconds = float((tmp_path / 'run' / 'wall_seconds_before_resume').read_text())
  assert stopped_seconds > 0
  monkeypatch.setattr(compare_recipes.train, 'train_and_evaluate', full)
  result = compare_recipes.run_one('tiny', f'{CARLA}:smoke', overrides, 0, 'validation',
                                   tmp_path / 'run', eval_size=[48, 64])
  steps = [json.loads(line)['step']
           for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert steps[0] == 1 and max(steps) > 1 and (tmp_path / 'run' / 'result.json').exists()
  assert 0 <= result['mean_iou'] <= 1
  assert result['wall_seconds'] > stopped_seconds  # the whole run's time, not the last call's


class _Process:
  def __init__(self, returncode=None):
    self.returncode = returncode

  def poll(self):
    return self.returncode


def test_a_recipes_other_seeds_wait_until_its_first_run_has_compiled(tmp_path):
  metrics = tmp_path / 'metrics.jsonl'
  assert not compare_recipes.has_compiled(_Process(), metrics, 0)  # no metrics yet
  metrics.write_text('{"step": 10}\n')
  assert compare_recipes.has_compiled(_Process(), metrics, 0)
  # A resumed run: lines from before it started do not count.
  assert not compare_recipes.has_compiled(_Process(), metrics, metrics.stat().st_size)
  assert compare_recipes.has_compiled(_Process(returncode=1), tmp_path / 'absent', 0)  # it ended
  job = lambda group: compare_recipes.Job([], tmp_path / 'log.txt', group)
  pending = [job('a'), job('a'), job('b')]
  assert compare_recipes.next_job(pending, lambda group: True) == 0
  assert compare_recipes.next_job(pending, lambda group: group != 'a') == 2
  assert compare_recipes.next_job(pending, lambda group: False) is None


def test_parallel_runs_match_serial_ones_and_failures_are_named(tmp_path):
  sets = [f'--set=data.data_dir={tmp_path / "scenes"}', '--set=data.synthetic_scenes=12',
          "--set=data.split_key='name'", '--set=data.validation_fraction=0.25',
          '--set=data.test_fraction=0.0', f'--set=data.prepared_dir={tmp_path / "prepared"}']
  script = str(REPO / 'scripts' / 'compare_recipes.py')
  # The runs' own cache (<workdir>/compilation_cache), not the test session's; tiny
  # programs compile in under the cache's default 1 s threshold.
  env = {name: value for name, value in os.environ.items() if name != 'JAX_COMPILATION_CACHE_DIR'}
  env.update(PYTHONPATH=str(REPO), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')

  def compare(workdir, *args):
    return subprocess.run([sys.executable, script, f'--workdir={tmp_path / workdir}', *sets, *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)

  # Side by side on a fresh machine: the runs write the scenes and prepare them at once.
  side_by_side = compare('parallel', '--parallel=3', '--seeds=0,1',
                         f'--recipe=tiny={CARLA}:smoke',
                         f'--recipe=broken={CARLA}:smoke;model.nonexistent=1')
  assert side_by_side.returncode == 1
  runs = tmp_path / 'parallel'
  for seed in (0, 1):
    assert (runs / 'tiny' / f'seed{seed}' / 'result.json').exists()
  for seed in (0, 1):
    line = f'{runs / "broken" / f"seed{seed}"}: failed (exit status 1); see '
    assert line in side_by_side.stdout
    assert 'no field model.nonexistent' in (runs / 'broken' / f'seed{seed}' / 'log.txt').read_text()
  assert '| tiny | 2 |' in side_by_side.stdout
  # The seeds shared compiled programs: the train step was compiled into the cache.
  assert any(path.name.startswith('jit_checked_train_step')
             for path in (runs / 'compilation_cache').iterdir())
  # A run in its own process trains exactly as the same run in the serial loop.
  serial = compare('serial', '--seeds=1', f'--recipe=tiny={CARLA}:smoke')
  assert serial.returncode == 0, serial.stderr
  a = json.loads((runs / 'tiny' / 'seed1' / 'result.json').read_text())
  b = json.loads((tmp_path / 'serial' / 'tiny' / 'seed1' / 'result.json').read_text())
  assert a['per_class_iou'] == b['per_class_iou'] and a['mean_iou'] == b['mean_iou']


def test_the_report_compares_recipes_recording_by_recording(tmp_path):
  for recipe, seed, gain in (('base', 0, 0.0), ('new', 0, 0.02), ('new', 1, 0.05)):
    run = tmp_path / recipe / f'seed{seed}'
    run.mkdir(parents=True)
    result = dict(_result(recipe, 0.9, 0.3 + gain, 0.0), seed=seed,
                  per_recording_mean_iou={'000': 0.2 + gain, '001': 0.4 - gain})
    (run / 'result.json').write_text(json.dumps(result))
  script = str(REPO / 'scripts' / 'compare_recipes.py')

  def report(*args):
    return subprocess.run([sys.executable, script, f'--workdir={tmp_path}', '--report_only',
                           '--seeds=0,1', f'--recipe=base={CARLA}', f'--recipe=new={CARLA}',
                           *args], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))

  shown = report()
  assert shown.returncode == 0, shown.stderr
  # Only seed 0 is shared: 000 +0.02, 001 -0.02.
  assert 'Against base, recording by recording' in shown.stdout
  assert '| new | 1 | 1 of 2 | +0.000 ± 0.028 | -0.020 (001) | +0.020 (000) |' in shown.stdout
  against_new = report('--reference=new')
  assert '| base | 1 | 1 of 2 |' in against_new.stdout
  wrong = report('--reference=missing')
  # One line, naming the flag and the recipes there are.
  assert wrong.returncode == 1
  assert wrong.stderr.strip().splitlines() == [
      'error: --reference=missing: not one of the recipes (base, new)']


def test_the_report_shows_the_ensembles_scored_before(tmp_path):
  settings = {'tta': {'flip': False, 'scales': [1.0]}, 'prior_correction': 0.0}
  for seed, mean_iou in ((0, 0.30), (1, 0.32)):
    run = tmp_path / 'new' / f'seed{seed}'
    run.mkdir(parents=True)
    (run / 'result.json').write_text(json.dumps(dict(_result('new', 0.9, mean_iou, 0.0),
                                                     seed=seed, **settings)))
  ensemble = dict(_result('new, seeds 0,1 averaged', 0.92, 0.345, 0.0), seed='ensemble',
                  **settings)
  (tmp_path / 'new' / 'ensemble_seeds0,1_result.json').write_text(json.dumps(ensemble))
  shown = subprocess.run(
      [sys.executable, str(REPO / 'scripts' / 'compare_recipes.py'), f'--workdir={tmp_path}',
       '--report_only', '--ensemble', '--seeds=0,1', f'--recipe=new={CARLA}'],
      capture_output=True, text=True, cwd=tmp_path, timeout=300,
      env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert shown.returncode == 0, shown.stderr
  table = shown.stdout.split("Each recipe's seeds as one model")[1]
  assert '| new, seeds 0,1 averaged | 1 | 0.920 | 0.345 |' in table
  assert '| new | 2 | 0.900 ± 0.000 | 0.310 ± 0.014 |' in shown.stdout
  written = json.loads((tmp_path / 'comparison_ensemble.json').read_text())
  assert [r['mean_iou'] for r in written] == [0.345]
