r"""Runs a trained U-Net on images of any size; writes masks and pictures.

    python -m unet_jax.predict --workdir=runs/carla --input=FILE_OR_DIR --output=DIR \
        [--checkpoint=best|latest|STEP] [--mode=resize|tile] [--batch_size=N] \
        [--[no]tta_flip] [--tta_scales=1.0,0.75,1.25] [--prior_correction=S] \
        [--ensemble=DIR[,DIR...]]

For every input PNG or JPEG (a file, or every file of a folder) it writes into
--output `<stem>_mask.png` (the CARLA mask format: class index in channel 0,
so predictions read back as data), `<stem>_color.png` (the CARLA palette)
and `<stem>_overlay.png` (the colours over the image), all at the input's
size. Two modes:

* resize (default): the image is resized to the training size as in
  training, and the prediction resized back with nearest neighbour. For a
  model trained on resized frames, such as configs/carla.py.
* tile: the model slides over the image at its native resolution, for a
  model trained on native-resolution crops (configs/unet_paper.py). With
  VALID padding this is the paper's overlap-tile strategy: output tiles abut,
  and each sees its full context, mirrored where it crosses the border. With
  SAME padding the tiles overlap by half and every pixel is taken from the
  tile whose centre is nearest, away from the zero padding at tile edges.

Tiles (one per image in resize mode with SAME padding) from all images are
batched together and sharded over the local devices along 'data'; the last
batch is padded. Nothing is written outside --output: the output folder may
not contain an input, and every file is written through a temporary file in
--output renamed over the target (a rename replaces a link rather than
writing through it). Unreadable inputs are reported by name and the rest
are still written. Test-time augmentation (unet_jax.tta) is the training
config's `inference.tta_flip` and `inference.tta_scales` unless the flags
say otherwise (`--notta_flip --tta_scales=1.0`: the model alone); so is
taking training's class-weight prior out of the predictions
(`inference.prior_correction`, `--prior_correction`; unet_jax.prior_correction).
`--ensemble` averages the class probabilities of other workdirs' models
(trained at the same input size) with this one's (unet_jax.ensemble).
"""

from collections.abc import Iterator
import dataclasses
import os
import pathlib
import secrets
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from unet_jax import carla_files
from unet_jax import checkpointing
from unet_jax import cli
from unet_jax import console
from unet_jax import ensemble
from unet_jax import errors
from unet_jax import metric_logging
from unet_jax import models
from unet_jax import preprocessing
from unet_jax import prior_correction
from unet_jax import sharding
from unet_jax import tta
from unet_jax import visualize
from unet_jax import xla_flags

MODES = ('resize', 'tile')
OUTPUT_SUFFIXES = ('_mask.png', '_color.png', '_overlay.png')


# --------------------------------------------------------------------------
# Paths: what to read, and where writing is allowed.


def list_inputs(input_path: str | os.PathLike) -> list[pathlib.Path]:
  """The input file, or every visible file of the input folder (not recursive), sorted."""
  path = pathlib.Path(input_path)
  if path.is_file():
    return [path]
  if path.is_dir():
    files = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith('.')]
    if not files:
      raise errors.UserError(f'--input folder {path} holds no files')
    return files
  raise errors.UserError(f'--input {path}: no such file or folder')


def check_output_dir(output_dir: str | os.PathLike,
                     inputs: list[pathlib.Path]) -> pathlib.Path:
  """The resolved output folder; refuses one that contains an input.

  Inputs are compared by their resolved paths, so a link to a file inside
  the output folder counts as inside it.
  """
  output = pathlib.Path(output_dir).resolve()
  if output.exists() and not output.is_dir():
    raise errors.UserError(f'--output {output_dir} exists and is not a folder')
  for path in inputs:
    resolved = path.resolve()
    if output == resolved or output in resolved.parents:
      raise errors.UserError(
          f'--output {output_dir} contains the input {path}: predictions could overwrite '
          'inputs. Choose an output folder outside the inputs.')
  return output


def write_inside(output_dir: pathlib.Path, file_name: str, data: bytes) -> pathlib.Path:
  """Writes `data` to output_dir/file_name and nowhere else.

  The bytes go to a new temporary file in output_dir (O_EXCL: never an
  existing file or link) that is then renamed over the target. A rename
  replaces a link at the target instead of following it, so an existing link
  cannot redirect the write outside output_dir.
  """
  target = output_dir / file_name
  if pathlib.Path(file_name).name != file_name or target.parent != output_dir:
    raise ValueError(f'{file_name!r} is not a plain file name')
  temporary = output_dir / f'.{file_name}.{secrets.token_hex(6)}.tmp'
  # Mode 0o666 less the umask, like any file the user creates.
  descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(descriptor, 'wb') as f:
      f.write(data)
    os.replace(temporary, target)
  except BaseException:
    temporary.unlink(missing_ok=True)
    raise
  return target


# --------------------------------------------------------------------------
# Tiles.


def tile_starts(length: int, window: int, stride: int) -> np.ndarray:
  """Evenly spaced window starts covering [0, max(length, window)), at most `stride` apart."""
  if length <= window:
    return np.zeros(1, np.int64)
  count = -(-(length - window) // stride) + 1
  return np.rint(np.linspace(0, length - window, count)).astype(np.int64)


def nearest_tile(length: int, starts: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
  """For each position: the tile whose centre is nearest, and the offset inside it."""
  positions = np.arange(length)
  centres = starts + window / 2
  tile = np.argmin(np.abs(positions[:, None] + 0.5 - centres[None, :]), axis=1)
  return tile, positions - starts[tile]


@dataclasses.dataclass(frozen=True)
class TilePlan:
  """How an image of `size` is cut into model inputs and put back together.

  Output tile (i, j) covers canvas rows starts_y[i]:+out_size[0] and
  columns starts_x[j]:+out_size[1]; its input is the window of the padded
  image that the model maps onto exactly that output.
  """
  size: tuple[int, int]  # the image (height, width)
  in_size: tuple[int, int]  # model input (the training size)
  out_size: tuple[int, int]  # model output for in_size
  starts_y: np.ndarray
  starts_x: np.ndarray

  @property
  def border(self) -> tuple[int, int]:
    # models.center_crop and the training labels align output to input this way.
    return ((self.in_size[0] - self.out_size[0]) // 2, (self.in_size[1] - self.out_size[1]) // 2)

  @property
  def num_tiles(self) -> int:
    return len(self.starts_y) * len(self.starts_x)


def plan_tiles(size, in_size, out_size) -> TilePlan:
  """Tiles of a model that maps `in_size` inputs onto centred `out_size` outputs."""
  out_size = tuple(out_size)
  # VALID (an output smaller than its input): every output pixel already has
  # its full context, so output tiles may abut (the paper). SAME: half-
  # overlapping tiles keep pixels away from the zero padding at tile edges.
  valid = out_size != tuple(in_size)
  stride = out_size if valid else tuple(max(1, n // 2) for n in out_size)
  return TilePlan(tuple(size), tuple(in_size), out_size,
                  tile_starts(size[0], out_size[0], stride[0]),
                  tile_starts(size[1], out_size[1], stride[1]))


def cut_tiles(image: np.ndarray, plan: TilePlan) -> np.ndarray:
  """float32 [num_tiles, in_h, in_w, 3]: the model inputs, mirror-padded at the borders."""
  (border_y, border_x), (height, width) = plan.border, plan.size
  canvas = (max(height, plan.out_size[0]), max(width, plan.out_size[1]))
  padded = np.pad(image, ((border_y, border_y + canvas[0] - height),
                          (border_x, border_x + canvas[1] - width), (0, 0)), mode='symmetric')
  in_h, in_w = plan.in_size
  return np.stack([padded[y:y + in_h, x:x + in_w] for y in plan.starts_y for x in plan.starts_x])


def assemble(tiles: np.ndarray, plan: TilePlan) -> np.ndarray:
  """Output tiles [num_tiles, out_h, out_w] -> the prediction [height, width]."""
  tiles = tiles.reshape(len(plan.starts_y), len(plan.starts_x), *plan.out_size)
  tile_y, offset_y = nearest_tile(plan.size[0], plan.starts_y, plan.out_size[0])
  tile_x, offset_x = nearest_tile(plan.size[1], plan.starts_x, plan.out_size[1])
  return tiles[tile_y[:, None], tile_x[None, :], offset_y[:, None], offset_x[None, :]]


# --------------------------------------------------------------------------
# One image.


def model_input(image: np.ndarray, mode: str, in_size: tuple[int, int]) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 in [0, 1] at the size the model will slide over."""
  if mode == 'resize':
    # Training's own resize; its mask argument is already at size, so untouched.
    image, _ = preprocessing.resize_pair(image, np.zeros(in_size, np.uint8), in_size)
  return image.astype(np.float32) / 255.0


def restore_size(prediction: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  if prediction.shape == tuple(size):
    return prediction
  return np.asarray(Image.fromarray(prediction).resize(size[::-1], Image.Resampling.NEAREST))


def output_files(image: np.ndarray, prediction: np.ndarray) -> dict[str, bytes]:
  """Suffix -> PNG bytes: the CARLA mask, the colour mask and the overlay."""
  return {
      '_mask.png': carla_files.encode_png(carla_files.mask_to_carla_rgba(prediction)),
      '_color.png': carla_files.encode_png(visualize.colorize(prediction)),
      '_overlay.png': carla_files.encode_png(visualize.overlay(image, prediction)),
  }


# --------------------------------------------------------------------------
# The whole run.


@dataclasses.dataclass
class PredictionRun:
  written: list[pathlib.Path]  # the inputs whose outputs were written
  failed: list[tuple[pathlib.Path, str]]  # (input, why); `why` names the file
  seconds: float


@dataclasses.dataclass
class _Pending:
  path: pathlib.Path
  image: np.ndarray
  plan: TilePlan
  tiles: np.ndarray  # uint8 [num_tiles, out_h, out_w], filled as batches return
  remaining: int


def _compile_predict(model, mesh, apply_fn=None):
  apply_fn = apply_fn or model.apply

  def predict(variables, images):
    return jnp.argmax(apply_fn(variables, images, train=False), axis=-1).astype(jnp.uint8)
  return jax.jit(predict, in_shardings=(sharding.replicated(mesh), sharding.data_sharded(mesh)),
                 out_shardings=sharding.data_sharded(mesh))


def _read_all(paths, mode, config, failed) -> Iterator[tuple]:
  """(path, image, plan, model input tiles) per readable input; failures go to `failed`."""
  in_size = tuple(config.data.image_size)
  stems = {}
  for path in paths:
    if path.stem in stems:
      failed.append((path, f'{path}: same name stem as {stems[path.stem]}, whose outputs '
                           'it would overwrite'))
      continue
    stems[path.stem] = path
    try:
      image = carla_files.read_image(path, carla_files.PHOTO_FORMATS)
    except carla_files.BadDataError as error:
      failed.append((path, str(error)))
      continue
    scaled = model_input(image, mode, in_size)
    plan = plan_tiles(scaled.shape[:2], in_size, models.label_size(config.model, in_size))
    yield path, image, plan, cut_tiles(scaled, plan)


def predict_files(workdir: str, input_path: str, output_dir: str, *, checkpoint: str = 'best',
                  mode: str = 'resize', batch_size: int = 0, tta_flip: bool | None = None,
                  tta_scales=None, prior_strength: float | None = None,
                  ensemble_workdirs=None) -> PredictionRun:
  """Predicts every input and writes its three PNGs into output_dir.

  Args:
    workdir: a training workdir (config.json and checkpoints).
    input_path: a PNG or JPEG file or a folder of them.
    output_dir: created if missing; must not contain an input.
    checkpoint: 'best', 'latest' or a step.
    mode: 'resize' or 'tile' (see the module docstring).
    batch_size: tiles per device batch; 0 takes the training batch size.
      Rounded up to a multiple of the local device count.
    tta_flip, tta_scales: test-time augmentation of every model input
      (unet_jax.tta); None takes the training config's `inference` field.
    prior_strength: how much of training's class-weight prior to take out
      of the predictions (unet_jax.prior_correction); None takes the
      config's `inference.prior_correction`.
    ensemble_workdirs: other workdirs ('a,b' or a list) whose models are
      averaged with this one's (unet_jax.ensemble); each must have been
      trained at the same input size. The settings above come from this
      workdir's config and apply to all of them.
  """
  if mode not in MODES:
    raise errors.UserError(f'mode must be one of {MODES}, got {mode!r}')
  paths = list_inputs(input_path)
  output = check_output_dir(output_dir, paths)
  # One process on all of its own devices: prediction needs no other host.
  mesh = sharding.local_mesh()
  members = ensemble.restore([workdir, *ensemble.parse_workdirs(ensemble_workdirs)], checkpoint,
                             sharding=sharding.replicated(mesh))
  config, step, model = members[0].config, members[0].step, members[0].model
  ensemble.check(members)
  if config.model.num_classes > 256:
    raise errors.UserError(f'{config.model.num_classes} classes do not fit the 8-bit CARLA mask')
  in_size = tuple(config.data.image_size)
  for member in members[1:]:  # every model takes the same tiles
    if tuple(member.config.data.image_size) != in_size:
      raise errors.UserError(
          f'{member.workdir}: trained at {tuple(member.config.data.image_size)} against '
          f'{in_size} in {workdir}: predict averages models of one input size')
  flip, scales = tta.settings(config, tta_flip, tta_scales)
  prior = prior_correction.strength(config, prior_strength)
  apply_fn = ensemble.apply_function(members, flip, scales, prior)
  variables = tuple(member.variables for member in members)
  # Only now, with a model to run: a failed start leaves no empty folder behind.
  checkpointing.check_writable(output, '--output')
  devices = mesh.devices.size
  batch_size = batch_size or int(config.batch_size)
  batch_size = -(-batch_size // devices) * devices
  predict = _compile_predict(model, mesh, apply_fn)
  logging.info('Predicting %d file(s) with checkpoint %d%s (%s mode, test-time augmentation: '
               '%s, class-weight prior correction: %s), batches of %d tiles on %d device(s).',
               len(paths), step,
               f' and {len(members) - 1} more model(s) averaged' if len(members) > 1 else '',
               mode, tta.describe(flip, scales), prior_correction.describe(prior), batch_size,
               devices)

  start = time.perf_counter()
  written, failed = [], []
  progress = metric_logging.Progress('predict', total=len(paths))
  queue: list[tuple[_Pending, int, np.ndarray]] = []  # (image, tile index, input tile)

  def finish(item: _Pending) -> None:
    prediction = restore_size(assemble(item.tiles, item.plan), item.image.shape[:2])
    for suffix, data in output_files(item.image, prediction).items():
      write_inside(output, item.path.stem + suffix, data)
    written.append(item.path)
    progress.update()

  def run_batch() -> None:
    batch = np.zeros((batch_size, *config.data.image_size, 3), np.float32)  # padding: zeros
    for row, (_, _, tile) in enumerate(queue):
      batch[row] = tile
    predictions = np.asarray(predict(variables, batch))
    for row, (item, index, _) in enumerate(queue):
      item.tiles[index] = predictions[row]
      item.remaining -= 1
      if item.remaining == 0:
        finish(item)
    queue.clear()

  failures_seen = 0
  for path, image, plan, tiles in _read_all(paths, mode, config, failed):
    item = _Pending(path, image, plan, np.zeros((plan.num_tiles, *plan.out_size), np.uint8),
                    plan.num_tiles)
    for index, tile in enumerate(tiles):
      queue.append((item, index, tile))
      if len(queue) == batch_size:
        run_batch()
    progress.update(len(failed) - failures_seen)
    failures_seen = len(failed)
  if queue:
    run_batch()
  progress.update(len(failed) - failures_seen)
  progress.close()
  seconds = time.perf_counter() - start
  for _, why in failed:
    logging.error('could not predict: %s', why)
  logging.info('Wrote predictions for %d of %d file(s) to %s in %.1f s.', len(written),
               len(paths), output, seconds)
  return PredictionRun(written, failed, seconds)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined only when it runs, so importing never clashes."""
  flags.DEFINE_string('workdir', None, 'Training workdir (config.json, checkpoints/).')
  flags.DEFINE_string('input', None, 'A PNG or JPEG image or a folder of them.')
  flags.DEFINE_string('output', None, 'Folder for the predictions (not containing inputs).')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a step number.")
  flags.DEFINE_enum('mode', 'resize', MODES,
                    'resize: to the training size and back; tile: native resolution.')
  flags.DEFINE_integer('batch_size', 0, 'Tiles per batch; 0: the training batch size.')
  flags.DEFINE_bool('tta_flip', None, 'Test-time augmentation: add mirrored views (default: the '
                    "training config's inference.tta_flip).")
  flags.DEFINE_list('tta_scales', None, 'Test-time augmentation: view scales, e.g. 1.0,0.75,1.25 '
                    "(default: the training config's inference.tta_scales; 1.0 for none).")
  flags.DEFINE_float('prior_correction', None,
                     "How much of training's class-weight prior to take out of the predictions: "
                     '0 none, 1 all (unet_jax.prior_correction; default: the training '
                     "config's inference.prior_correction).")
  flags.DEFINE_list('ensemble', None, 'Other training workdirs whose models are averaged with '
                    "--workdir's (their class probabilities), e.g. runs/seed1,runs/seed2.")
  flags.mark_flags_as_required(['workdir', 'input', 'output'])


def main(argv):
  xla_flags.set_default_flags()  # before JAX starts: XLA reads XLA_FLAGS once
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  console.setup(verbose=cli.verbose())
  run = predict_files(FLAGS.workdir, FLAGS.input, FLAGS.output, checkpoint=FLAGS.checkpoint,
                      mode=FLAGS.mode, batch_size=FLAGS.batch_size, tta_flip=FLAGS.tta_flip,
                      tta_scales=FLAGS.tta_scales, prior_strength=FLAGS.prior_correction,
                      ensemble_workdirs=FLAGS.ensemble)
  if run.failed:
    print(f'{len(run.failed)} input(s) failed:')
    for _, why in run.failed:
      print(f'  {why}')
    raise SystemExit(1)


def run() -> None:
  """The console script `unet-jax-predict`."""
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
