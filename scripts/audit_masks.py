r"""Finds frames whose mask belongs to another frame of the same recording.

    python -m unet_jax.predict --workdir=runs/carla_pretrained --notta_flip --tta_scales=1.0 \
        --input=/path/to/carla/CameraRGB --output=predictions/
    python scripts/audit_masks.py --data_dir=/path/to/carla --predictions=predictions/

A mask that was stored under the wrong frame's name looks like a good mask of
another scene, so no check of the file can find it. A trained model can: its
prediction for the frame agrees with the pixels of the frame, and so with the
right mask. For every frame this compares the prediction (`<name>_mask.png`
in --predictions, as `unet_jax.predict` writes it) with the frame's own mask
and with the mask of every other frame of its recording (the name's first
three characters, as `data.split_key='recording'` groups them). A frame is
listed when another frame's mask agrees with its prediction by more than
--margin (a share of the pixels) above its own mask: the model is wrong in
the same places under either mask, so only a mask of another scene can make
that difference. Consecutive frames of a recording are nearly identical, so
the right mask usually sits among the frames around it.

On the 490 frames of `../shared/carla`, scored with `carla_pretrained.py`'s
seed 0 (80 epochs, the model alone), 7 frames stand out, each by 0.076 to
0.265 of its pixels (000034, 000044, 000073, 000084, 000085 of recording 000;
011478, 011486); the next frame's margin is 0.005. Leave such frames out with
`--config.data.exclude_frames` (README, Data). The model should not have
trained on the frames it audits, or it may have learnt a wrong mask; a frame
among many near-identical ones is found anyway, as 011478 and 011486 were.

Per listed frame: the agreement of its own mask, and the frame whose mask
agrees best and how well. `--json=PATH` also writes every frame's figures.
Pixels are compared on a grid of every --stride-th row and column.
"""

import collections
import json
import pathlib
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from unet_jax import carla_dataset  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import carla_files  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
PREDICTION_SUFFIX = '_mask.png'


def agreements(prediction: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """Share of pixels where `prediction` [H, W] equals each of `masks` [N, H, W]."""
  return (masks == prediction[None]).mean(axis=(1, 2))


def audit(predictions: dict[str, np.ndarray], masks: dict[str, np.ndarray],
          margin: float, split_key: str = 'recording') -> list[dict]:
  """Every frame's agreement with its own mask and with the best other mask of its group.

  predictions and masks: {frame name: class indices [H, W]}, the same names
  and, within a group, the same shape. Returns one record per frame (name,
  own, best_other, best_other_agreement, margin, misplaced), sorted by
  margin, largest first; `misplaced` is margin > `margin`. A frame alone in
  its group has no other mask: best_other is None and its margin 0.
  """
  groups = collections.defaultdict(list)
  for name in sorted(masks):
    groups[carla_dataset.group_key(name, split_key)].append(name)
  records = []
  for names in groups.values():
    stacked = np.stack([masks[n] for n in names])
    for i, name in enumerate(names):
      scores = agreements(predictions[name], stacked)
      own = float(scores[i])
      scores[i] = -1.0
      j = int(np.argmax(scores))
      best = float(scores[j]) if len(names) > 1 else None
      gap = best - own if best is not None else 0.0
      records.append({'frame': name, 'own': own,
                      'best_other': names[j] if best is not None else None,
                      'best_other_agreement': best, 'margin': gap, 'misplaced': gap > margin})
  return sorted(records, key=lambda r: (-r['margin'], r['frame']))


def load(data_dir: str, predictions_dir: str, stride: int) -> tuple[dict, dict]:
  """The masks of a CARLA-format folder and their predictions, on a grid of `stride`.

  Raises errors.UserError naming the file for a missing or unreadable
  prediction, or one whose size is not its mask's.
  """
  pairs, problems = carla_files.list_pairs(data_dir)
  if problems:
    raise errors.UserError(f'{problems[0]} (and {len(problems) - 1} more problem(s))'
                           if len(problems) > 1 else problems[0])
  folder = pathlib.Path(predictions_dir)
  if not folder.is_dir():
    raise errors.UserError(f'{folder}: no such folder of predictions; write it with '
                           'python -m unet_jax.predict --input=<data_dir>/CameraRGB')
  masks, predictions = {}, {}
  for pair in pairs:
    path = folder / f'{pair.name}{PREDICTION_SUFFIX}'
    if not path.is_file():
      raise errors.UserError(f'{path}: missing; predict every frame of {data_dir} first')
    mask = carla_files.read_mask(pair.mask_path)
    prediction = carla_files.read_mask(path)
    if prediction.shape != mask.shape:
      raise errors.UserError(f'{path}: {prediction.shape[1]}x{prediction.shape[0]} pixels, but '
                             f'its mask {pair.mask_path} has {mask.shape[1]}x{mask.shape[0]}')
    masks[pair.name] = mask[::stride, ::stride]
    predictions[pair.name] = prediction[::stride, ::stride]
  return predictions, masks


def report(records: list[dict], margin: float) -> str:
  listed = [r for r in records if r['misplaced']]
  lines = [f'{len(listed)} of {len(records)} frames: another mask of the recording agrees with '
           f'the prediction by more than {margin:g} of the pixels above their own']
  for r in listed:
    lines.append(f'  {r["frame"]}: own mask {r["own"]:.3f}, mask of {r["best_other"]} '
                 f'{r["best_other_agreement"]:.3f} (+{r["margin"]:.3f})')
  rest = [r for r in records if not r['misplaced']]
  if rest:
    lines.append(f'the largest margin of the others: {rest[0]["margin"]:+.3f} ({rest[0]["frame"]})')
  if listed:
    names = ', '.join(repr(name) for name in sorted(r['frame'] for r in listed))
    lines.append(f'to leave them out: --config.data.exclude_frames="({names},)"')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  predictions, masks = load(FLAGS.data_dir, FLAGS.predictions, FLAGS.stride)
  records = audit(predictions, masks, FLAGS.margin)
  print(report(records, FLAGS.margin))
  if FLAGS.json:
    pathlib.Path(FLAGS.json).write_text(json.dumps(records, indent=1) + '\n')


if __name__ == '__main__':
  flags.DEFINE_string('data_dir', None, 'CARLA-format folder (CameraRGB/, CameraMask/).')
  flags.DEFINE_string('predictions', None,
                      'Folder of <name>_mask.png predictions (unet_jax.predict --output).')
  flags.DEFINE_float('margin', 0.03, 'Share of pixels by which another mask must agree better.',
                     lower_bound=0.0, upper_bound=1.0)
  flags.DEFINE_integer('stride', 4, 'Compare every stride-th row and column.', lower_bound=1)
  flags.DEFINE_string('json', '', 'Also write every frame\'s figures to this file.')
  flags.mark_flags_as_required(['data_dir', 'predictions'])
  cli.run(main)
