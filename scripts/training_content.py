r"""What training sees: each class's share of the training examples as the
input pipeline delivers them, against its share of the whole frames.

    python scripts/training_content.py --config=configs/carla_pretrained.py \
        --config.data.data_dir=/path/to/carla --epochs=3
    # the same with --config.data.augment.rare_windows=0.5 shows what the lever adds

Per class: percent of the training split's pixels in whole frames at
`data.image_size`; percent of the pixels of the training examples over
`--epochs` epochs of the config's seed, after everything the config does to
them (crops and zoom, flips, copy-paste, rare-class sampling and windows);
and percent of those examples holding at least one of its pixels. Nothing
trains; the numbers are those a run with this config would see, so a crop,
zoom or sampling setting can be judged before any training time is spent.
Classes absent from both are left out. `--json=PATH` writes the figures too.
"""

import json
import pathlib
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from unet_jax import classes  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import config_checks  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import console  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def training_content(config, epochs: int) -> dict[str, np.ndarray]:
  """float64 [num_classes] each: 'frames' (share of whole-frame pixels),
  'examples' (share of training-example pixels over `epochs` epochs) and
  'holding' (share of training examples with a pixel of the class)."""
  num_classes = config.model.num_classes
  train = input_pipeline.create_datasets(config, sharding.create_mesh())['train']
  frames = train.class_pixel_counts().astype(np.float64)
  pixels = np.zeros(num_classes, np.float64)
  holding = np.zeros(num_classes, np.float64)
  examples = 0
  for epoch in range(epochs):
    for batch in train.train_batches(epoch):
      labels, valid = jax.device_get((batch['label'], batch['valid']))
      for label in np.asarray(labels)[np.asarray(valid)]:
        label = label[(label >= 0) & (label < num_classes)]
        counts = np.bincount(label, minlength=num_classes)
        pixels += counts
        holding += counts > 0
        examples += 1
  return {'frames': frames / max(frames.sum(), 1), 'examples': pixels / max(pixels.sum(), 1),
          'holding': holding / max(examples, 1)}


def table(content: dict[str, np.ndarray], names=classes.CLASS_NAMES) -> str:
  """Markdown rows, the classes by their whole-frame share, largest first."""
  lines = ['| class | % of whole-frame pixels | % of training-example pixels | ratio | '
           '% of examples holding it |', '|---|---|---|---|---|']
  for k in np.argsort(-content['frames'], kind='stable'):
    frame, example = 100 * content['frames'][k], 100 * content['examples'][k]
    if frame == 0 and example == 0:
      continue
    ratio = f'{example / frame:.2f}' if frame else '-'
    lines.append(f'| {names[k]} | {frame:.3f} | {example:.3f} | {ratio} | '
                 f'{100 * content["holding"][k]:.0f} |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  config_checks.check_fields(config)
  console.setup(verbose=cli.verbose())
  config_checks.check_config(config, num_devices=jax.device_count())
  content = training_content(config, FLAGS.epochs)
  print(table(content))
  if FLAGS.json:
    pathlib.Path(FLAGS.json).write_text(json.dumps(
        {key: dict(zip(classes.CLASS_NAMES, map(float, values)))
         for key, values in content.items()}, indent=1))


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Training config file (Python).',
                                  lock_config=True)
  flags.DEFINE_integer('epochs', 3, 'Training epochs to draw.', lower_bound=1)
  flags.DEFINE_string('json', '', 'Also write the figures to this file.')
  flags.mark_flags_as_required(['config'])
  cli.run(main)
