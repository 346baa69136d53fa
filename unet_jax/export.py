r"""Exports a trained U-Net to StableHLO or ONNX, with what a consumer needs.

    python -m unet_jax.export --workdir=runs/carla --checkpoint=best \
        --format=onnx|stablehlo --output=DIR

Writes into DIR (one export per folder) `model.onnx` or `model.stablehlo`
and `model.json` beside it: the file's sha256, the class names and colours,
the input (float32 NHWC RGB in [0, 1], its training size and which sizes the
model takes), the output, the checkpoint step and the whole config. `unet_jax.exported` loads both
files and refuses a damaged or mismatched pair.

* stablehlo: `jax.export` of the model's logits function, the variables
  baked in as constants, serialized; batch, height and width are symbolic
  where the model allows (height and width multiples of 2**depth with SAME
  padding, the lattice of valid sizes with VALID), else only the batch. It
  computes in the model's own dtype (bfloat16 where the config says so).
* onnx: the same function, always computed in float32 (ONNX Runtime's CPU
  kernels have no bfloat16 convolution), written by `unet_jax.onnx_graph`:
  standard operators (Conv with batch norm folded in, Relu, MaxPool,
  ConvTranspose, Einsum, Concat, ...) and the same dynamic axes, opset 17.
"""

import datetime
import hashlib
import json
import os
import pathlib
import secrets

from absl import app
from absl import flags
from absl import logging
import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np

from unet_jax import checkpointing
from unet_jax import classes
from unet_jax import cli
from unet_jax import console
from unet_jax import errors
from unet_jax import efficientnet
from unet_jax import models
from unet_jax import xla_flags

FORMATS = ('onnx', 'stablehlo')
FILE_NAMES = {'onnx': 'model.onnx', 'stablehlo': 'model.stablehlo'}
METADATA_FILE = 'model.json'
METADATA_VERSION = 1
INPUT_NAME, OUTPUT_NAME = 'images', 'logits'
DIM_NAMES = ('batch', 'height', 'width')


def restore(workdir: str, checkpoint: str):
  """(config, variables, step) of a workdir's checkpoint, on this host's first device."""
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return checkpointing.restore_model(workdir, checkpoint, sharding=sharding)


# --------------------------------------------------------------------------
# What the exported function takes.


def size_rule(model_config) -> tuple[int, int]:
  """(scale, offset): the valid input lengths are scale*k + offset for k >= 1."""
  if models.encoder_name(model_config) != 'unet':
    return efficientnet.STRIDE, 0
  depth, padding = model_config.depth, model_config.padding
  scale = 2**depth
  smallest = models.smallest_input_for_output((1,), depth, padding)[0]
  return scale, smallest - scale


def input_shape(model_config, image_size, *, dynamic_size: bool) -> list[str]:
  """`jax.export` dimension expressions of the NHWC input."""
  if not dynamic_size:
    return ['b', str(image_size[0]), str(image_size[1]), '3']
  scale, offset = size_rule(model_config)
  side = lambda var: f'{scale}*{var}' + (f' + {offset}' if offset else '')
  return ['b', side('h'), side('w'), '3']


def logits_function(model, variables):
  def logits(images):
    return model.apply(variables, images, train=False)
  return logits


def _spec(shape: list[str]) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(jax_export.symbolic_shape(', '.join(shape)), jnp.float32)


def _with_fallback(build, model_config, image_size):
  """build(shape) with symbolic height/width, or with the fixed training size
  where the model cannot take symbolic ones. Returns (result, shape)."""
  shape = input_shape(model_config, image_size, dynamic_size=True)
  try:
    return build(shape), shape
  except Exception as error:  # pylint: disable=broad-except
    logging.warning('Symbolic height/width not possible (%s); exporting at %s.',
                    str(error).splitlines()[0], tuple(image_size))
  shape = input_shape(model_config, image_size, dynamic_size=False)
  return build(shape), shape


def stablehlo_bytes(model, variables, model_config, image_size) -> tuple[bytes, list[str]]:
  """Serialized `jax.export` module and its input shape expressions."""
  function = jax.jit(logits_function(model, variables))

  def build(shape):
    return jax_export.export(function, platforms=('cpu', 'cuda'))(_spec(shape)).serialize()

  return _with_fallback(build, model_config, image_size)


def onnx_bytes(model, variables, model_config, image_size,
               metadata: dict) -> tuple[bytes, list[str]]:
  """The ONNX model (float32 compute) and its input shape expressions."""
  from unet_jax import onnx_graph  # pylint: disable=g-import-not-at-top  (the 'export' extra)
  function = logits_function(model.clone(dtype=jnp.float32), variables)

  def build(shape):
    proto = onnx_graph.to_onnx(function, _spec(shape), input_name=INPUT_NAME,
                               output_name=OUTPUT_NAME, dim_names=DIM_NAMES)
    return proto

  proto, shape = _with_fallback(build, model_config, image_size)
  props = {key: json.dumps(value) for key, value in metadata.items()}
  props['input_shape'] = json.dumps(shape)
  del proto.metadata_props[:]
  for key, value in props.items():
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value
  return proto.SerializeToString(), shape


# --------------------------------------------------------------------------
# Metadata.


def describe(config, step: int, workdir: str) -> dict:
  """What a consumer needs besides the file (its hash and shapes are added on export)."""
  num_classes = int(config.model.num_classes)
  palette = classes.PALETTE
  scale, offset = size_rule(config.model)
  return {
      'metadata_version': METADATA_VERSION,
      'checkpoint_step': int(step),
      'workdir': str(pathlib.Path(workdir).resolve()),
      'exported_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'class_names': [classes.class_name(i) for i in range(num_classes)],
      'class_colors': [[int(c) for c in palette[i % len(palette)]] for i in range(num_classes)],
      'input': {
          'name': INPUT_NAME, 'layout': 'NHWC', 'dtype': 'float32', 'channels': 'RGB',
          'normalization': 'pixel / 255: values in [0, 1], no mean or std',
          'training_size': [int(n) for n in config.data.image_size],
          'valid_sizes': f'height and width each {scale}*k + {offset} for k >= 1',
      },
      'output': {
          'name': OUTPUT_NAME, 'layout': 'NHWC', 'dtype': 'float32',
          'what': 'per-pixel class logits; argmax over the last axis is the class index',
          'size': ('the input size' if config.model.padding == 'SAME' else
                   'the input size less a border (VALID padding: models.output_size)'),
      },
      'model_dtype': str(config.model.dtype),
      'config': json.loads(config.to_json()),
  }


def _write(directory: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
  """Writes through a temporary file renamed over the target."""
  target = directory / name
  temporary = directory / f'.{name}.{secrets.token_hex(6)}.tmp'
  try:
    temporary.write_bytes(data)
    os.replace(temporary, target)
  finally:
    temporary.unlink(missing_ok=True)
  return target


def export_model(config, variables, step: int, *, file_format: str, output_dir: str,
                 workdir: str = '') -> pathlib.Path:
  """Writes the model file and model.json into output_dir; returns the model file."""
  if file_format not in FORMATS:
    raise ValueError(f'format must be one of {FORMATS}, got {file_format!r}')
  model = models.unet_from_config(config.model)
  image_size = tuple(int(n) for n in config.data.image_size)
  metadata = describe(config, step, workdir)
  if file_format == 'stablehlo':
    data, shape = stablehlo_bytes(model, variables, config.model, image_size)
    metadata['compute_dtype'] = str(config.model.dtype)
  else:
    metadata['compute_dtype'] = 'float32'
    data, shape = onnx_bytes(model, variables, config.model, image_size, metadata)
  metadata['input']['shape'] = shape
  metadata['input']['dynamic_size'] = shape[1] != str(image_size[0])
  output = pathlib.Path(output_dir)
  for other, name in FILE_NAMES.items():
    if other != file_format and (output / name).exists():
      raise errors.UserError(f'{output / name} exists: {output_dir} holds a {other} export; '
                       'write each format to its own folder')
  output.mkdir(parents=True, exist_ok=True)
  path = _write(output, FILE_NAMES[file_format], data)
  metadata.update(format=file_format, file=path.name, sha256=hashlib.sha256(data).hexdigest(),
                  bytes=len(data))
  _write(output, METADATA_FILE, (json.dumps(metadata, indent=1) + '\n').encode())
  return path


def export_workdir(workdir: str, checkpoint: str, file_format: str,
                   output_dir: str) -> pathlib.Path:
  config, variables, step = restore(workdir, checkpoint)
  variables = jax.tree.map(np.asarray, variables)
  return export_model(config, variables, step, file_format=file_format, output_dir=output_dir,
                      workdir=workdir)


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'Training workdir (config.json, checkpoints/).')
  flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a step number.")
  flags.DEFINE_enum('format', 'onnx', FORMATS, 'onnx or stablehlo.')
  flags.DEFINE_string('output', None, 'Folder for the model file and model.json.')
  flags.mark_flags_as_required(['workdir', 'output'])


def main(argv):
  xla_flags.set_default_flags()  # before JAX starts: XLA reads XLA_FLAGS once
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  console.setup(verbose=cli.verbose())
  path = export_workdir(FLAGS.workdir, FLAGS.checkpoint, FLAGS.format, FLAGS.output)
  metadata = json.loads((path.parent / METADATA_FILE).read_text())
  print(f'wrote {path} ({path.stat().st_size / 1e6:.1f} MB, checkpoint step '
        f"{metadata['checkpoint_step']}, input {metadata['input']['shape']}) and "
        f'{path.parent / METADATA_FILE}')


def run() -> None:
  """The console script `unet-jax-export`."""
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
