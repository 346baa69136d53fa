r"""Evaluates a trained checkpoint and writes a report a person can read.

    python -m unet_jax.evaluate --workdir=runs/carla [--split=validation|test] \
        [--checkpoint=best|latest|STEP] [--data_dir=DIR] [--num_images=8] \
        [--eval_size=480,640|model] [--[no]tta_flip] [--tta_scales=1.0,0.75,1.25] \
        [--noweight_average] [--prior_correction=S] [--ensemble=DIR[,DIR...]]

Works from the workdir alone: its config.json and checkpoints. Whole frames
are scored at the config's `inference.eval_size` (CARLA's native 480x640 in
the carla configs): the model sees each frame at its training size and its
class probabilities come back to the frame's pixels, with the config's
test-time augmentation (`inference.tta_flip`, `inference.tta_scales`)
and class-weight prior correction (`inference.prior_correction`,
unet_jax.prior_correction); the flags override them. With
--data_dir it evaluates every pair of any CARLA-format folder instead of a
split (less the frames named in the config's `data.exclude_frames`),
preprocessed as in training; the split is then called
`folder-<folder name>`. A run that kept a moving average of its weights
(`ema_decay` > 0) is scored with that average, as training scored it;
`--noweight_average` scores the optimizer's own weights of the same
checkpoint instead, so one run measures what the average adds.
`--ensemble` adds the models of other workdirs (the same `--checkpoint` of
each): their class probabilities are averaged with the first model's
(unet_jax.ensemble), every model with the same test-time augmentation and
prior correction; a workdir that trained on other frames than the first
cannot join the scoring of a split. Writes
`<workdir>/eval/<split>-<step>/` for the config's own scoring; a flag that
changes it adds its setting to the folder's name (`-480x640`, `-notta`,
`-tta_flip_0.75,1,1.25`, `-prior0.25`, `-no_average`, `-ensemble3_<hash>`),
so each way of scoring a checkpoint keeps its own report (unet_jax.report
writes it):

* metrics.json: pixel accuracy, mean IoU, mean class accuracy, loss,
  per-class IoU, accuracy and pixel count by name, the confusion matrix,
  and the same for each recording scored on its own (`per_recording`; a
  recording is the first three characters of a frame's name, as the split
  groups frames);
* report.md: the numbers, the per-recording table (with the IoU of the
  config's `data.rare_classes`) and its spread, the per-class table,
  most frequent class first, where each class's errors go (recall,
  precision, predicted over true pixels, the classes its pixels went to
  and the true classes of its false predictions), and the two pictures
  below;
* confusion.png: the row-normalised confusion matrix;
* examples.png: `num_images` frames as image | truth | prediction | errors.

The metrics come from training's own compiled eval step and
`evaluation.evaluate`: for the same checkpoint and split, with
`--eval_size=model --notta_flip --tta_scales=1.0`, they equal training's
evaluation (the model alone at its own size). The model's variables alone
are restored (`checkpointing.restore_model`); nothing of training is
imported.
"""

import hashlib
import pathlib

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unet_jax import carla_dataset
from unet_jax import checkpointing
from unet_jax import classes
from unet_jax import cli
from unet_jax import console
from unet_jax import ensemble
from unet_jax import errors
from unet_jax import evaluation
from unet_jax import input_pipeline
from unet_jax import metric_logging
from unet_jax import models
from unet_jax import prior_correction
from unet_jax import report
from unet_jax import sharding
from unet_jax import tta
from unet_jax import xla_flags

EVAL_DIR = 'eval'


def load_split(config, mesh, split: str, data_dir: str | None, workdir: str):
  """The data to evaluate and the name the report gives it."""
  if data_dir is None:
    datasets = input_pipeline.create_datasets(config, mesh)
    if split not in datasets:
      raise errors.UserError(f'split must be one of {sorted(datasets)}, got {split!r}')
    return datasets[split], split
  folder = pathlib.Path(data_dir).resolve()
  # The prepared copy goes into the workdir, not into the person's folder
  # (which may be read-only), one copy per folder path.
  path_key = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
  prepared_dir = pathlib.Path(workdir) / EVAL_DIR / 'prepared' / f'{folder.name}-{path_key}'
  data = input_pipeline.folder_dataset(config, mesh, folder, prepared_dir=str(prepared_dir))
  return data, f'folder-{folder.name}'


def _host_copy(x) -> np.ndarray:
  """A replicated global array as numpy, on any process (each holds all of it)."""
  return np.asarray(x.addressable_data(0))


def collect_examples(model, variables, data, mesh, num_images: int, ignore_label: int,
                     apply_fn=None) -> dict:
  """The first `num_images` frames of a split with their predictions, as numpy.

  Images are cropped to the labelled centre (all of it with SAME padding), so
  that the four panels of a row line up pixel for pixel.
  """
  replicated = sharding.replicated(mesh)

  def predict(variables, batch):
    logits = (apply_fn or model.apply)(variables, batch['image'], train=False)
    return batch['image'], batch['label'], batch['valid'], jnp.argmax(logits, -1)

  predict = jax.jit(predict, in_shardings=(replicated, sharding.data_sharded(mesh)),
                    out_shardings=replicated)
  images, labels, predictions = [], [], []
  for batch in data.eval_batches():
    if len(images) >= num_images:
      break
    image, label, valid, prediction = (_host_copy(x) for x in predict(variables, batch))
    for i in np.flatnonzero(valid)[:num_images - len(images)]:
      images.append(image[i])
      labels.append(label[i])
      predictions.append(prediction[i])
  if not images:
    return {'images': [], 'labels': [], 'predictions': [], 'scored': []}
  height, width = data.label_size
  cropped = models.center_crop(np.stack(images), height, width)
  num_classes = model.num_classes
  scored = [(y >= 0) & (y < num_classes) & (y != ignore_label) for y in labels]
  return {
      'images': [np.rint(255 * np.clip(x, 0, 1)).astype(np.uint8) for x in cropped],
      # Unscored pixels are drawn as class 0 (black) and marked white in the error panel.
      'labels': [np.where(s, y, 0) for y, s in zip(labels, scored)],
      'predictions': predictions,
      'scored': scored,
  }


def _rare_class_names(config) -> list[str]:
  """The config's data.rare_classes as class names (given as names or indices)."""
  names = []
  for entry in (config.data.get('rare_classes') or ()):
    names.append(classes.class_name(entry) if isinstance(entry, int) else str(entry))
  return names


def scoring_size(config, eval_size=None) -> tuple[int, int]:
  """The (height, width) whole frames are scored at: eval_size as given
  ('model', or () for the model's input size; 'H,W' or a pair), else the
  config's inference.eval_size, else the model's input size (workdirs from
  before that field)."""
  model_size = tuple(int(n) for n in config.data.image_size)
  if eval_size is None:
    eval_size = (config.get('inference') or {}).get('eval_size', ())
  values = eval_size.split(',') if isinstance(eval_size, str) else list(eval_size)
  if values in ([], ['model']):
    return model_size
  try:
    size = tuple(int(n) for n in values)
  except (TypeError, ValueError):
    size = ()
  if len(size) != 2 or min(size) < 1:
    raise errors.UserError("eval_size must be height,width (two positive integers) or 'model', "
                           f'got {eval_size!r}')
  return size


def weights_used(config, weight_average: bool = True) -> str:
  """Which weights are scored: 'average' (the moving average a run with
  `ema_decay` > 0 kept), 'optimizer' (a run without one) or report.AVERAGE_LEFT_OUT
  (a run with one, weight_average=False)."""
  if config.get('ema_decay', 0.0) > 0:
    return 'average' if weight_average else report.AVERAGE_LEFT_OUT
  return 'optimizer'


def report_folder_name(config, split_name: str, step: int, size, flip: bool, scales,
                       prior: float, weights: str) -> str:
  """`<split>-<step>` for the config's own scoring (its `inference` field),
  plus a tag for each setting a flag changed: `-<H>x<W>` (eval size),
  `-notta` or `-tta[_flip][_<scales>]`, `-prior<strength>`, `-no_average`.
  Each way of scoring a checkpoint keeps its own report."""
  name = f'{split_name}-{step}'
  if tuple(size) != scoring_size(config):
    name += f'-{size[0]}x{size[1]}'
  scales = tuple(float(s) for s in scales)
  if (bool(flip), scales) != tta.settings(config):
    if not flip and scales == (1.0,):
      name += '-notta'
    else:
      name += '-tta' + ('_flip' if flip else '') + (
          '' if scales == (1.0,) else '_' + ','.join(f'{s:g}' for s in scales))
  if prior != prior_correction.strength(config):
    name += f'-prior{prior:g}'
  if weights == report.AVERAGE_LEFT_OUT:
    name += '-no_average'
  return name


def evaluate_workdir(workdir: str, split: str = 'validation', checkpoint: str = 'best',
                     data_dir: str | None = None, num_images: int = 8,
                     tta_flip: bool | None = None, tta_scales=None,
                     skip_bad_pairs: bool | None = None, eval_size=None,
                     weight_average: bool = True, prior_strength: float | None = None,
                     ensemble_workdirs=None):
  """Evaluates a workdir's checkpoint on a split (or a folder) and writes the report.

  eval_size, tta_flip and tta_scales: where given, the size whole frames are
  scored at (`scoring_size`) and the test-time augmentation (unet_jax.tta);
  None takes the training config's `inference` field. skip_bad_pairs: skip
  unreadable pairs with a warning instead of stopping; None keeps the
  training config's setting. weight_average=False scores the optimizer's
  weights of a run that kept a moving average (`ema_decay` > 0).
  prior_strength: how much of training's class-weight prior to take out of
  the predictions (unet_jax.prior_correction); None takes the config's
  `inference.prior_correction`. ensemble_workdirs: other workdirs ('a,b' or
  a list) whose models are averaged with this one's (unet_jax.ensemble); the
  settings above come from this workdir's config and apply to all of them.

  Returns:
    (summary, out_dir): `evaluation.evaluate`'s summary plus 'step',
    'eval_size', 'tta', 'weights', 'prior_correction' and 'ensemble' (the
    models scored: workdir and step each; what was used) and 'per_recording'
    ({recording: its own metrics, confusion matrix and num_examples}), and
    the report folder `<workdir>/eval/<report_folder_name>`.
  """
  mesh = sharding.create_mesh()
  members = ensemble.restore([workdir, *ensemble.parse_workdirs(ensemble_workdirs)], checkpoint,
                             sharding=sharding.replicated(mesh), weight_average=weight_average)
  config, step, model = members[0].config, members[0].step, members[0].model
  ensemble.check(members, None if data_dir is not None else split)
  weights = weights_used(config, weight_average)
  if skip_bad_pairs is not None:
    config.data.skip_bad_pairs = skip_bad_pairs
  model_size = tuple(int(n) for n in config.data.image_size)
  size = scoring_size(config, eval_size)
  flip, scales = tta.settings(config, tta_flip, tta_scales)
  prior = prior_correction.strength(config, prior_strength)
  apply_fn = ensemble.apply_function(members, flip, scales, prior, frame_size=size,
                                     hint=' (--eval_size=model --tta_scales=1.0)')
  variables = tuple(member.variables for member in members)
  # The report is written after all the scoring: find out now if it cannot be.
  if jax.process_index() == 0:
    checkpointing.check_writable(pathlib.Path(workdir) / EVAL_DIR, 'report folder')
  frames = config
  if size != model_size:  # the frames at `size`, the model at its own
    frames = ml_collections.ConfigDict(config.to_dict())
    frames.data.image_size = size
  data, split_name = load_split(frames, mesh, split, data_dir, workdir)
  recordings = [carla_dataset.group_key(name, 'recording') for name in data.frame_names()]
  summary = evaluation.evaluate(
      evaluation.compile_eval_step(frames, mesh, model, apply_fn, per_example=True),
      variables, data, groups=recordings)
  summary['per_recording'] = summary.pop('per_group')
  summary.update(step=step, eval_size=size, tta={'flip': flip, 'scales': list(scales)},
                 weights=weights, prior_correction=prior, ensemble=ensemble.describe(members))
  examples = collect_examples(model, variables, data, mesh, num_images, config.ignore_label,
                              apply_fn)
  out_dir = pathlib.Path(workdir) / EVAL_DIR / (report_folder_name(
      config, split_name, step, size, flip, scales, prior, weights) + ensemble.tag(members))
  if jax.process_index() == 0:
    record = report.metrics_record(summary, split=split_name, step=step, workdir=workdir,
                            num_examples=data.num_examples, data_dir=data_dir,
                            class_names=classes.CLASS_NAMES)
    record.update(eval_size=list(size), model_size=list(model_size), tta=summary['tta'],
                  weights=weights, prior_correction=prior,
                  report_classes=_rare_class_names(config))
    if len(members) > 1:
      record['ensemble'] = ensemble.describe(members)
    report.write_report(out_dir, record, examples)
    logging.info('%s at step %d:\n%s', split_name, step, metric_logging.per_class_table(summary))
  return summary, out_dir


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined only when it runs, so importing never clashes."""
  flags.DEFINE_string('workdir', None, 'Training workdir (config.json, checkpoints/).')
  flags.DEFINE_string('split', 'validation', "'validation', 'test' or 'train'.")
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a step number.")
  flags.DEFINE_string('data_dir', None, 'A CARLA-format folder to evaluate instead of a split.')
  flags.DEFINE_integer('num_images', 8, 'Frames shown in examples.png.')
  flags.DEFINE_list('eval_size', None, "height,width to score whole frames at (e.g. 480,640), "
                    "or 'model' for the model's input size (default: the training config's "
                    'inference.eval_size).')
  flags.DEFINE_bool('tta_flip', None, 'Test-time augmentation: add mirrored views (default: the '
                    "training config's inference.tta_flip).")
  flags.DEFINE_list('tta_scales', None, 'Test-time augmentation: view scales, e.g. 1.0,0.75,1.25 '
                    "(default: the training config's inference.tta_scales; 1.0 for none).")
  flags.DEFINE_bool('skip_bad_pairs', None,
                    'Skip unreadable image/mask pairs with a warning (default: the training '
                    "config's data.skip_bad_pairs).")
  flags.DEFINE_float('prior_correction', None,
                     "How much of training's class-weight prior to take out of the predictions: "
                     '0 none, 1 all (unet_jax.prior_correction; default: the training '
                     "config's inference.prior_correction).")
  flags.DEFINE_bool('weight_average', True,
                    'For a run that kept a moving average of its weights (ema_decay > 0): score '
                    "the average (as training did) or, with --noweight_average, the optimizer's "
                    'weights of the same checkpoint.')
  flags.DEFINE_list('ensemble', None, 'Other training workdirs whose models are averaged with '
                    "--workdir's (their class probabilities), e.g. runs/seed1,runs/seed2.")
  flags.mark_flag_as_required('workdir')


def main(argv):
  xla_flags.set_default_flags()  # before JAX starts: XLA reads XLA_FLAGS once
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  console.setup(verbose=cli.verbose())
  summary, out_dir = evaluate_workdir(FLAGS.workdir, FLAGS.split, FLAGS.checkpoint,
                                      FLAGS.data_dir, FLAGS.num_images, FLAGS.tta_flip,
                                      FLAGS.tta_scales, FLAGS.skip_bad_pairs, FLAGS.eval_size,
                                      FLAGS.weight_average, FLAGS.prior_correction,
                                      FLAGS.ensemble)
  height, width = summary['eval_size']
  augmentation = tta.describe(summary['tta']['flip'], summary['tta']['scales'])
  weights = {'average': ', weight average', report.AVERAGE_LEFT_OUT: ", optimizer's weights"}.get(
      summary['weights'], '')
  if summary['prior_correction']:
    weights += f', class-weight prior out at {summary["prior_correction"]:g}'
  if len(summary['ensemble']) > 1:
    weights += f', ensemble of {len(summary["ensemble"])} models'
  print(f'step {summary["step"]} ({height}x{width} frames, test-time augmentation: '
        f'{augmentation}{weights}): pixel accuracy {summary["pixel_accuracy"]:.4f}, '
        f'mean IoU {summary["mean_iou"]:.4f}, mean class accuracy '
        f'{summary["mean_class_accuracy"]:.4f}\nreport: {out_dir / "report.md"}')


def run() -> None:
  """The console script `unet-jax-evaluate`."""
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
