r"""Trains several configs on the same split with the same seeds; one table.

    python scripts/compare_recipes.py --configs=configs/carla_lab.py,configs/carla.py \
        --seeds=0,1,2 --workdir=runs/compare --set=data.data_dir=/path/to/carla

Each (config, seed) trains in `<workdir>/<config>/seed<k>` with
`unet_jax.train.train_and_evaluate`, so an interrupted comparison resumes
where it stopped and a finished run is only re-evaluated. Prints pixel
accuracy, mean IoU and the IoU of the classes that matter most for driving,
with wall time and training images/s; over several seeds, mean ± standard
deviation. Writes every figure to `<workdir>/comparison.json`.
"""

import importlib.util
import json
import pathlib
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from unet_jax import classes  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.DEFINE_list('configs', None, 'Config files, each optionally file.py:arg.')
SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds; every config trains once per seed.')
WORKDIR = flags.DEFINE_string('workdir', 'runs/compare', 'Where the runs and the table go.')
OVERRIDES = flags.DEFINE_multi_string('set', [], 'key=value applied to every config, '
                                      'e.g. data.data_dir=/data/carla (value parsed as Python '
                                      'literal when it is one).')
SPLIT = flags.DEFINE_string('split', 'validation', 'Split the table reports.')

REPORTED_CLASSES = ('Road', 'Sky', 'Vehicles', 'Pedestrian', 'RoadLine', 'Pole', 'TrafficSign')


def load_config(spec: str):
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def apply_override(config, assignment: str) -> None:
  import ast  # pylint: disable=g-import-not-at-top
  key, _, text = assignment.partition('=')
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  target = config
  *parents, leaf = key.split('.')
  for parent in parents:
    target = target[parent]
  if leaf not in target:
    raise KeyError(f'--set {assignment}: the config has no field {key}')
  target[leaf] = value


def run_one(spec: str, seed: int, workdir: pathlib.Path) -> dict:
  config = load_config(spec)
  for assignment in OVERRIDES.value:
    apply_override(config, assignment)
  config.seed = seed
  config.eval_split = SPLIT.value
  start = time.perf_counter()
  summary = train.train_and_evaluate(config, str(workdir))
  wall = time.perf_counter() - start
  # Images/s from the run's own log (excludes evaluation, and holds for resumed runs).
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  rates = [line['images_per_second'] for line in lines if 'images_per_second' in line]
  iou = {name: float(summary['per_class_iou'][classes.CLASS_NAMES.index(name)])
         for name in REPORTED_CLASSES}
  return {'config': spec, 'seed': seed, 'pixel_accuracy': summary['pixel_accuracy'],
          'mean_iou': summary['mean_iou'], 'iou': iou, 'wall_seconds': wall,
          'images_per_second': float(np.median(rates)) if rates else float('nan'),
          'epochs': config.num_epochs, 'per_class_iou': [float(x) for x in summary['per_class_iou']]}


def _cell(values) -> str:
  values = np.asarray(values, np.float64)
  if np.all(np.isnan(values)):
    return '-'
  if len(values) == 1:
    return f'{values[0]:.3f}'
  return f'{np.nanmean(values):.3f} ± {np.nanstd(values, ddof=1):.3f}'


def table(results: list[dict]) -> str:
  header = (['config', 'seeds', 'pixel acc', 'mean IoU'] + list(REPORTED_CLASSES)
            + ['wall s', 'images/s'])
  rows = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for spec in dict.fromkeys(r['config'] for r in results):
    runs = [r for r in results if r['config'] == spec]
    cells = [spec, str(len(runs)), _cell([r['pixel_accuracy'] for r in runs]),
             _cell([r['mean_iou'] for r in runs])]
    cells += [_cell([r['iou'][name] for r in runs]) for name in REPORTED_CLASSES]
    cells += [f'{np.mean([r["wall_seconds"] for r in runs]):.0f}',
              f'{np.mean([r["images_per_second"] for r in runs]):.1f}']
    rows.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(rows)


def main(argv):
  del argv
  root = pathlib.Path(WORKDIR.value)
  root.mkdir(parents=True, exist_ok=True)
  results = []
  for spec in FLAGS.value:
    for seed in SEEDS.value:
      name = pathlib.Path(spec.partition(':')[0]).stem + (
          '-' + spec.partition(':')[2] if spec.partition(':')[2] else '')
      logging.info('Training %s with seed %s', spec, seed)
      results.append(run_one(spec, int(seed), root / name / f'seed{seed}'))
      (root / 'comparison.json').write_text(json.dumps(results, indent=2))
  print(table(results))


if __name__ == '__main__':
  flags.mark_flag_as_required('configs')
  app.run(main)
