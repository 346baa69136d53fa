r"""Trains several recipes on the same split with the same seeds; one table.

    python scripts/compare_recipes.py --configs=configs/carla_lab.py,configs/carla.py \
        --seeds=0,1,2 --workdir=runs/compare --set=data.data_dir=/path/to/carla

A recipe is a config file (optionally `file.py:arg`), or with `--recipe` a
named config file plus overrides of its own, separated by ';':

    --recipe='carla-unweighted=configs/carla.py;class_weighting=none'

`--set key=value` applies to every recipe (values are Python literals where
they parse as one). `{seed}` in an override is the run's seed: with
`init_from=runs/base/carla_pretrained/seed{seed}` each seed fine-tunes the
model of the same seed (README, Training). Each (recipe, seed) trains in
`<workdir>/<recipe>/seed<k>` with `unet_jax.train.train_and_evaluate` and leaves its figures in
`result.json` there: an interrupted comparison resumes where it stopped, a
finished run is not trained again, and several invocations on the same
workdir (one per recipe, say, sharing one GPU) can run at the same time. The
table covers pixel accuracy, mean IoU and the IoU of the classes that matter
most for driving, with wall time and training images/s; over several seeds,
mean ± standard deviation. `<workdir>/comparison.json` (`comparison_tta_*.json`
with test-time augmentation) holds every figure.

With `--eval_size` each validation recording is also scored on its own, and
a second table compares every recipe with the first (or `--reference`)
recording by recording: the mean IoU difference of each recording, averaged
over the seeds both ran, as mean ± spread across the recordings, with how many
recordings gain. The models are meant for recordings that are not in the
split: a gain that shows on most recordings is better evidence than one that
comes from one or two of them, which the split's single figure cannot tell.
The table says whether each pair was trained on the same kind of machine
(`result.json`'s `machine`: the CPU's model and cores, or the accelerators):
a run repeats on one machine, not on another, where the same seed
can differ as much as two seeds do.

`--eval_size=480,640` scores every recipe on whole frames at that size (the
CARLA frames' native size), whatever size it trains at: each frame goes to
the model at the recipe's `data.image_size` and the class probabilities come
back to the frame's pixels (unet_jax.tta). `--tta_flip` and `--tta_scales`
add test-time augmentation to that evaluation, and `--prior_correction=S`
takes training's class-weight prior out of the predictions at strength S
(unet_jax.prior_correction); on finished runs they score the trained model
again (into `result_tta_*.json`, `result_prior*.json`) without training.

`--ensemble` also scores each recipe's finished seeds as one model, their
class probabilities averaged (unet_jax.ensemble), the same way as the runs
alone: a table of its own and `comparison_ensemble*.json`.

`--parallel=N` trains N runs at a time side by side, each in its own process
(one accelerator shared, its memory allocated as needed), with its console
in `<workdir>/<recipe>/seed<k>/log.txt`; the table follows when all are done.
The runs of a recipe differ only in their seed, so they share compiled
programs through JAX's persistent compilation cache (`<workdir>/compilation_cache`,
or `JAX_COMPILATION_CACHE_DIR` where set): a recipe's first run starts
alone and its other seeds once it has compiled (logged its first training
steps), instead of every run compiling the same programs at once.
A run that fails is named with its log and the command exits non-zero after
the table of the others. On one GPU small runs then keep it busy together:

    python scripts/compare_recipes.py --parallel=9 --seeds=0,1,2 --eval_size=480,640 \
        --configs=configs/carla_lab.py,configs/carla.py,configs/carla_pretrained.py \
        --workdir=runs/quality --set=data.data_dir=/path/to/carla
"""

import ast
import importlib.util
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import NamedTuple

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from unet_jax import classes  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import console  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import evaluate  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import prior_correction  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import tta  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIGS = flags.DEFINE_list('configs', [], 'Config files, each optionally file.py:arg; the '
                            'recipe is named after the file.')
RECIPES = flags.DEFINE_multi_string('recipe', [], "name=file.py[:arg][;key=value;...]: a named "
                                    'config with overrides of its own.')
SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds; every recipe trains once per seed.')
WORKDIR = flags.DEFINE_string('workdir', 'runs/compare', 'Where the runs and the table go.')
OVERRIDES = flags.DEFINE_multi_string('set', [], 'key=value applied to every recipe, '
                                      'e.g. data.data_dir=/data/carla.')
SPLIT = flags.DEFINE_string('split', 'validation', 'Split the table reports.')
EVAL_SIZE = flags.DEFINE_list('eval_size', [], 'height,width to score whole frames at (e.g. '
                              '480,640, native CARLA); empty: each recipe at its own size.')
TTA_FLIP = flags.DEFINE_bool('tta_flip', False, 'Test-time augmentation: add mirrored views.')
TTA_SCALES = flags.DEFINE_list('tta_scales', ['1.0'], 'Test-time augmentation: view scales.')
PRIOR = flags.DEFINE_float('prior_correction', 0.0, "Strength of the class-weight prior taken "
                           'out of the predictions (unet_jax.prior_correction); 0: none.')
PARALLEL = flags.DEFINE_integer('parallel', 1, 'Runs trained at a time, each in its own '
                                'process (1: one after the other in this one).')
SHARE_COMPILATION = flags.DEFINE_bool(
    'share_compilation', True, 'With --parallel: the seeds of a recipe reuse its first run\'s '
    'compiled programs (persistent compilation cache) and start once it has compiled.')
REFERENCE = flags.DEFINE_string('reference', '', 'The recipe the others are compared with '
                                'recording by recording (with --eval_size); empty: the first.')
ENSEMBLE = flags.DEFINE_bool('ensemble', False, "Also score each recipe's finished seeds as one "
                              'model, their class probabilities averaged (unet_jax.ensemble).')
REPORT_ONLY = flags.DEFINE_bool('report_only', False, 'Train nothing: print the table of the '
                                'runs that have finished.')

REPORTED_CLASSES = ('Road', 'Sky', 'Vehicles', 'Pedestrian', 'RoadLine', 'Pole', 'TrafficSign')


def load_config(spec: str):
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def apply_override(config, assignment: str) -> None:
  key, _, text = assignment.partition('=')
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  target = config
  *parents, leaf = key.strip().split('.')
  for parent in parents:
    target = target[parent]
  if leaf not in target:
    raise KeyError(f'override {assignment!r}: the config has no field {key}')
  target[leaf] = value


def parse_recipes(config_specs, recipe_specs) -> dict[str, tuple[str, list[str]]]:
  """name -> (config spec, its own overrides)."""
  recipes = {}
  for spec in config_specs:
    path, _, arg = spec.partition(':')
    recipes[pathlib.Path(path).stem + (f'-{arg}' if arg else '')] = (spec, [])
  for text in recipe_specs:
    name, sep, rest = text.partition('=')
    if not sep or not name or not rest:
      raise app.UsageError(f'--recipe {text!r}: expected name=file.py[;key=value;...]')
    spec, *overrides = [part for part in rest.split(';') if part.strip()]
    recipes[name] = (spec, overrides)
  if not recipes:
    raise app.UsageError('name at least one recipe with --configs or --recipe')
  return recipes


def build_config(spec: str, overrides: list[str], seed: int, split: str):
  """The config of one run: `overrides` applied in order (a later one wins),
  `{seed}` in them replaced by `seed`."""
  config = load_config(spec)
  for assignment in overrides:
    apply_override(config, assignment.replace('{seed}', str(seed)))
  config.seed = seed
  config.eval_split = split
  return config


def evaluate_at(config, workdir: str, eval_size, flip: bool = False, scales=(1.0,),
                prior: float = 0.0) -> dict:
  """The summary of the workdir's latest checkpoint on config.eval_split, with whole
  frames at eval_size (height, width) and the model at config.data.image_size
  (`unet_jax.evaluate`, which also leaves its report in `<workdir>/eval/`)."""
  summary, _ = evaluate.evaluate_workdir(workdir, config.eval_split, 'latest', num_images=0,
                                         tta_flip=flip, tta_scales=scales,
                                         eval_size=tuple(int(n) for n in eval_size),
                                         prior_strength=prior)
  return summary


def result_name(flip: bool = False, scales=(1.0,), prior: float = 0.0) -> str:
  """The file a run's figures go to: `result.json`, or with test-time
  augmentation or prior correction one file per setting, so that a trained
  run can be scored every way."""
  scales = tuple(tta.parse_scales(scales))
  name = 'result'
  if flip or scales != (1.0,):
    name += '_tta' + ('_flip' if flip else '') + '_' + ','.join(f'{s:g}' for s in scales)
  if prior:
    name += f'_prior{prior:g}'
  return name + '.json'


def training_machine() -> str:
  """The machine training runs on, as `result.json` records it: the
  accelerators' kind, or the CPU's model name and core count. A run repeats
  on one machine but not on another, so a one-seed comparison is
  read against a reference trained on the same kind."""
  device = jax.devices()[0]
  if device.platform != 'cpu':
    return f'{jax.device_count()} x {device.device_kind}'
  name = platform.processor() or 'unknown CPU'
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        name = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  return f'{name}, {os.cpu_count()} cores'


def run_one(name: str, spec: str, overrides: list[str], seed: int, split: str,
            workdir: pathlib.Path, eval_size=(), flip: bool = False, scales=(1.0,),
            prior: float = 0.0) -> dict:
  """Trains (or resumes) one run; its figures, also left in `result_name(...)`.

  With eval_size (or test-time augmentation) the figures are those of
  `evaluate_at`; otherwise those of training's last evaluation. A run that
  finished (its `result.json` exists) is scored again with other test-time
  augmentation without training. A run stopped by a signal (SIGTERM, Ctrl-C)
  exits with its checkpoint and no figures, so the same command resumes it;
  the resumed run's wall time counts the stopped calls too. A run trained
  before training recorded its class weights gets them recorded now, from
  its config and data, for the prior correction.
  """
  result_file = workdir / result_name(flip, scales, prior)
  if result_file.exists():
    return json.loads(result_file.read_text())
  config = build_config(spec, overrides, seed, split)
  trained = workdir / 'result.json'
  if trained.exists():  # scored before without test-time augmentation
    earlier_result = json.loads(trained.read_text())
    wall, machine = earlier_result['wall_seconds'], earlier_result.get('machine')
    summary = None
  else:
    # Wall time of earlier calls that a signal stopped: a resumed run reports its whole time.
    earlier = workdir / 'wall_seconds_before_resume'
    start = time.perf_counter()
    summary = train.train_and_evaluate(config, str(workdir))
    wall = time.perf_counter() - start + (float(earlier.read_text()) if earlier.exists() else 0.0)
    machine = training_machine()
    if summary.get('stopped'):  # a signal: score nothing, leave the run to resume
      earlier.write_text(f'{wall:.1f}')
      raise SystemExit(f'{workdir}: training stopped at step {summary["step"]} before its end; '
                       'the same command resumes it.')
  if prior and not (workdir / prior_correction.WEIGHTS_FILE).exists():
    train.record_class_weights(config, str(workdir))
  if (summary is None or eval_size or flip or tuple(tta.parse_scales(scales)) != (1.0,)
      or prior):
    summary = evaluate_at(config, str(workdir), eval_size or config.data.image_size, flip, scales,
                          prior)
  # Images/s from the run's own log (excludes evaluation, and holds for resumed runs).
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  rates = [line['images_per_second'] for line in lines if 'images_per_second' in line]
  result = {'recipe': name, 'config': spec, 'overrides': overrides, 'seed': seed,
            'wall_seconds': wall, 'machine': machine,
            'images_per_second': float(np.median(rates)) if rates else float('nan'),
            'epochs': config.num_epochs, 'image_size': list(config.data.image_size),
            'eval_size': [int(n) for n in (eval_size or config.data.image_size)],
            'tta': {'flip': bool(flip), 'scales': list(tta.parse_scales(scales))},
            'prior_correction': float(prior), **figures(summary)}
  result_file.write_text(json.dumps(result, indent=2))
  return result


def figures(summary: dict) -> dict:
  """A result's scores from an evaluation summary: the summaries, every
  class's IoU (and the reported classes' by name) and, where it was scored
  recording by recording, each recording's mean IoU."""
  result = {'pixel_accuracy': summary['pixel_accuracy'], 'mean_iou': summary['mean_iou'],
            'mean_class_accuracy': summary['mean_class_accuracy'],
            'iou': {name: float(summary['per_class_iou'][classes.CLASS_NAMES.index(name)])
                    for name in REPORTED_CLASSES},
            'per_class_iou': [float(x) for x in summary['per_class_iou']]}
  if 'per_recording' in summary:  # scored by `evaluate_at`: each recording on its own too
    result['per_recording_mean_iou'] = {
        recording: float(group['mean_iou'])
        for recording, group in summary['per_recording'].items()}
  return result


def ensemble_name(name: str, seeds) -> str:
  return f'{name}, seeds {",".join(str(s) for s in seeds)} averaged'


def run_ensemble(runs: list[dict], workdirs: list[pathlib.Path], split: str,
                 score: bool = True) -> dict | None:
  """A recipe's finished runs (`run_one`'s results, one per seed, all scored
  the same way) scored again as one model, their class probabilities
  averaged (unet_jax.ensemble), with the same frames, test-time augmentation
  and prior correction; the figures are also left in
  `<recipe>/ensemble_seeds<k,...>_<result_name>` and read back from there.
  Its wall time and images/s are the runs' summed and averaged. With
  score=False only figures left before are read (None where there are none)."""
  first = runs[0]
  seeds = [r['seed'] for r in runs]
  flip, scales, prior = first['tta']['flip'], first['tta']['scales'], first['prior_correction']
  result_file = workdirs[0].parent / (f'ensemble_seeds{",".join(str(s) for s in seeds)}_'
                                      + result_name(flip, scales, prior))
  if result_file.exists():
    return json.loads(result_file.read_text())
  if not score:
    return None
  summary, _ = evaluate.evaluate_workdir(
      str(workdirs[0]), split, 'latest', num_images=0, tta_flip=flip, tta_scales=scales,
      eval_size=tuple(first['eval_size']), prior_strength=prior,
      ensemble_workdirs=[str(w) for w in workdirs[1:]])
  result = {'recipe': ensemble_name(first['recipe'], seeds), 'config': first['config'],
            'overrides': first['overrides'], 'seed': 'ensemble', 'seeds': seeds,
            'wall_seconds': float(sum(r['wall_seconds'] for r in runs)),
            'machine': first.get('machine'),
            'images_per_second': float(np.mean([r['images_per_second'] for r in runs])),
            'epochs': first['epochs'], 'image_size': first['image_size'],
            'eval_size': first['eval_size'], 'tta': first['tta'], 'prior_correction': prior,
            **figures(summary)}
  result_file.write_text(json.dumps(result, indent=2))
  return result


def _cell(values) -> str:
  values = np.asarray(values, np.float64)
  values = values[~np.isnan(values)]  # NaN: the class is absent from that run's split
  if not len(values):
    return '-'
  if len(values) == 1:
    return f'{values[0]:.3f}'
  return f'{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}'


def table(results: list[dict], class_names=REPORTED_CLASSES) -> str:
  header = (['recipe', 'seeds', 'pixel acc', 'mean IoU'] + list(class_names)
            + ['wall s', 'images/s'])
  rows = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for name in dict.fromkeys(r['recipe'] for r in results):
    runs = [r for r in results if r['recipe'] == name]
    cells = [name, str(len(runs)), _cell([r['pixel_accuracy'] for r in runs]),
             _cell([r['mean_iou'] for r in runs])]
    cells += [_cell([r['per_class_iou'][classes.CLASS_NAMES.index(c)] for r in runs])
              for c in class_names]
    cells += [f'{np.mean([r["wall_seconds"] for r in runs]):.0f}',
              f'{np.mean([r["images_per_second"] for r in runs]):.1f}']
    rows.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(rows)


def _signed(value: float) -> str:
  return f'{round(float(value), 3) + 0.0:+.3f}'  # + 0.0: no '-0.000'


def paired_table(results: list[dict], reference: str) -> str:
  """Each recipe against `reference`, recording by recording: the difference
  in mean IoU of each validation recording scored on its own, averaged over
  the seeds both recipes ran, then its mean ± standard deviation across the
  recordings, how many recordings gain, and the lowest and highest; last,
  whether each pair was trained on the same kind of machine ("no" when one
  was not: the same seed differs between machines as much as two seeds do;
  "unknown" when a run does not say).

  Runs without per-recording scores (scored at training's own size) are left out.
  """
  def by_seed(name):
    return {r.get('seed'): r['per_recording_mean_iou'] for r in results
            if r['recipe'] == name and 'per_recording_mean_iou' in r}

  def machines(name):
    return {r.get('seed'): r.get('machine') for r in results if r['recipe'] == name}

  base, base_machines = by_seed(reference), machines(reference)
  rows = ['| recipe | seeds | recordings that gain | mean IoU difference | lowest | highest '
          '| same machine |',
          '|---|---|---|---|---|---|---|']
  for name in dict.fromkeys(r['recipe'] for r in results):
    runs, run_machines = by_seed(name), machines(name)
    seeds = sorted(set(runs) & set(base), key=str)
    if name == reference or not seeds:
      continue
    recordings = sorted(set.intersection(*(set(runs[s]) & set(base[s]) for s in seeds)))
    if not recordings:
      continue
    diffs = np.array([np.mean([runs[s][rec] - base[s][rec] for s in seeds])
                      for rec in recordings])
    spread = f' ± {np.std(diffs, ddof=1):.3f}' if len(diffs) > 1 else ''
    low, high = int(np.argmin(diffs)), int(np.argmax(diffs))
    pairs = [(run_machines.get(s), base_machines.get(s)) for s in seeds]
    if any(a and b and a != b for a, b in pairs):
      same = 'no'
    else:
      same = 'yes' if all(a and b for a, b in pairs) else 'unknown'
    rows.append(f'| {name} | {len(seeds)} | {int(np.sum(diffs > 0))} of {len(diffs)} '
                f'| {_signed(np.mean(diffs))}{spread} | {_signed(diffs[low])} ({recordings[low]}) '
                f'| {_signed(diffs[high])} ({recordings[high]}) | {same} |')
  return '\n'.join(rows) if len(rows) > 2 else ''


def child_command(name: str, spec: str, overrides: list[str], seed: int) -> list[str]:
  """The command line that trains one (recipe, seed) in a process of its own,
  with this invocation's shared flags."""
  command = [sys.executable, str(pathlib.Path(__file__).resolve()), '--parallel=1',
             f'--workdir={WORKDIR.value}', f'--seeds={seed}', f'--split={SPLIT.value}',
             f'--recipe={name}=' + ';'.join([spec, *overrides]),
             f'--tta_scales={",".join(TTA_SCALES.value)}',
             '--tta_flip' if TTA_FLIP.value else '--notta_flip',
             f'--prior_correction={PRIOR.value}']
  if EVAL_SIZE.value:
    command.append(f'--eval_size={",".join(EVAL_SIZE.value)}')
  return command + [f'--set={assignment}' for assignment in OVERRIDES.value]


class Job(NamedTuple):
  """One (recipe, seed) in a process of its own; runs of one `group` share compiled programs."""
  command: list[str]
  log: pathlib.Path
  group: str = ''


def has_compiled(process, metrics: pathlib.Path, size_at_start: int) -> bool:
  """Whether a group's first run has compiled: it wrote training metrics
  since it started (its first log step), or it ended (finished or failed)."""
  if process.poll() is not None:
    return True
  try:
    return metrics.stat().st_size > size_at_start
  except FileNotFoundError:
    return False


def next_job(pending: list[Job], may_start) -> int | None:
  """The index of the first pending job whose group `may_start`, else None."""
  return next((i for i, job in enumerate(pending) if may_start(job.group)), None)


def run_side_by_side(jobs: list[Job], parallel: int, cache_dir: pathlib.Path | None = None
                     ) -> list[str]:
  """Runs the jobs, `parallel` at a time; the failures' lines.

  With `cache_dir`, every job compiles through that persistent compilation
  cache and a group's later jobs wait until its first one has compiled.
  """
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false')  # share one accelerator
  if cache_dir is not None:
    env.setdefault('JAX_COMPILATION_CACHE_DIR', str(cache_dir))
  first_of: dict[str, tuple] = {}  # group -> (process, metrics file, its size at start)

  def may_start(group: str) -> bool:
    if cache_dir is None or group not in first_of:
      return True
    return has_compiled(*first_of[group])

  pending, running, failures = list(jobs), [], []
  while pending or running:
    while len(running) < parallel and (index := next_job(pending, may_start)) is not None:
      job = pending.pop(index)
      job.log.parent.mkdir(parents=True, exist_ok=True)
      metrics = job.log.parent / 'metrics.jsonl'
      size = metrics.stat().st_size if metrics.exists() else 0
      with open(job.log, 'ab') as out:
        process = subprocess.Popen(job.command, stdout=out, stderr=subprocess.STDOUT, env=env)
      running.append((process, job.log))
      first_of.setdefault(job.group, (process, metrics, size))
    time.sleep(0.2)
    for process, log in list(running):
      if process.poll() is not None:
        running.remove((process, log))
        if process.returncode:
          failures.append(f'{log.parent}: failed (exit status {process.returncode}); see {log}')
        else:
          logging.info('Finished %s', log.parent)
  return failures


def main(argv):
  xla_flags.set_default_flags()  # before JAX starts: XLA reads XLA_FLAGS once
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  console.setup(verbose=cli.verbose())
  root = pathlib.Path(WORKDIR.value)
  root.mkdir(parents=True, exist_ok=True)
  results, failures = [], []
  recipes = parse_recipes(CONFIGS.value, RECIPES.value)
  if REFERENCE.value and REFERENCE.value not in recipes:
    raise errors.UserError(f'--reference={REFERENCE.value}: not one of the recipes '
                           f'({", ".join(recipes)})')
  if PARALLEL.value > 1 and not REPORT_ONLY.value:
    jobs = [Job(child_command(name, spec, overrides, int(seed)),
                root / name / f'seed{seed}' / 'log.txt', name)
            for name, (spec, overrides) in recipes.items() for seed in SEEDS.value]
    logging.info('Training %d runs, %d at a time; their consoles go to <run>/log.txt', len(jobs),
                 PARALLEL.value)
    failures = run_side_by_side(jobs, PARALLEL.value,
                                root / 'compilation_cache' if SHARE_COMPILATION.value else None)
  for name, (spec, overrides) in recipes.items():
    for seed in SEEDS.value:
      workdir = root / name / f'seed{seed}'
      if REPORT_ONLY.value or PARALLEL.value > 1:
        result_file = workdir / result_name(TTA_FLIP.value, TTA_SCALES.value, PRIOR.value)
        if result_file.exists():
          results.append(json.loads(result_file.read_text()))
        continue
      logging.info('Recipe %s (%s %s), seed %s', name, spec, ';'.join(overrides), seed)
      results.append(run_one(name, spec, [*OVERRIDES.value, *overrides], int(seed), SPLIT.value,
                             workdir, [int(n) for n in EVAL_SIZE.value], TTA_FLIP.value,
                             TTA_SCALES.value, PRIOR.value))
  ensembles = []
  if ENSEMBLE.value:
    for name in recipes:
      runs = [r for r in results if r['recipe'] == name]
      if len(runs) > 1:
        ensemble = run_ensemble(runs, [root / name / f'seed{r["seed"]}' for r in runs],
                                SPLIT.value, score=not REPORT_ONLY.value)
        ensembles += [ensemble] if ensemble else []
  for line in failures:
    print(line)
  if not results:
    print('No finished runs.')
    return 1 if failures else None
  comparison = result_name(TTA_FLIP.value, TTA_SCALES.value, PRIOR.value).replace(
      'result', 'comparison', 1)
  (root / comparison).write_text(json.dumps(results, indent=2))
  print(table(results))
  print()
  print('Per-class IoU:')
  present = [c for c in classes.CLASS_NAMES
             if any(not np.isnan(r['per_class_iou'][classes.CLASS_NAMES.index(c)])
                    for r in results)]
  print(table(results, class_names=present))
  if ensembles:
    print()
    print("Each recipe's seeds as one model, their class probabilities averaged (--ensemble; "
          'wall s: their training summed):')
    print(table(ensembles, class_names=present))
    (root / comparison.replace('comparison', 'comparison_ensemble', 1)).write_text(
        json.dumps(ensembles, indent=2))
  reference = REFERENCE.value or next(iter(recipes))
  paired = paired_table(results, reference)
  if paired:
    print()
    print(f'Against {reference}, recording by recording (mean IoU of each recording scored '
          'on its own, the seeds both ran):')
    print(paired)
  return 1 if failures else None


if __name__ == '__main__':
  cli.run(main)
