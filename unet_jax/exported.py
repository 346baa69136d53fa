"""Loads a model written by `unet_jax.export`, refusing damaged or mismatched files.

    from unet_jax import exported
    run, metadata = exported.load('DIR')          # model.onnx or model.stablehlo + model.json
    logits = run(images)                          # float32 NHWC in [0, 1] -> float32 NHWC logits
    classes = logits.argmax(-1)                   # index into metadata['class_names']

Before anything runs, the model file's sha256 and size must match model.json,
and for ONNX the metadata inside the file must name the same checkpoint step
and config; otherwise ExportError names the file and the problem. This
module imports neither the model code nor flax: only json, hashlib, numpy,
and jax (StableHLO) or onnxruntime (ONNX) when that format is loaded.
"""

from collections.abc import Callable
import hashlib
import json
import pathlib

import numpy as np

METADATA_FILE = 'model.json'
FORMATS = {'onnx': 'model.onnx', 'stablehlo': 'model.stablehlo'}
REQUIRED = ('metadata_version', 'format', 'file', 'sha256', 'bytes', 'checkpoint_step',
            'class_names', 'class_colors', 'input', 'output', 'config')


class ExportError(ValueError):
  """An exported model that must not be used; the message names the file."""


def read_metadata(directory: str | pathlib.Path) -> dict:
  """model.json of an export folder, checked against the model file it names."""
  directory = pathlib.Path(directory)
  path = directory / METADATA_FILE
  if not path.is_file():
    raise ExportError(f'{path} does not exist: {directory} is not an export folder')
  try:
    metadata = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ExportError(f'{path} is damaged: not valid JSON ({error})') from error
  missing = [key for key in REQUIRED if key not in metadata] if isinstance(metadata, dict) else [
      'all']
  if missing:
    raise ExportError(f'{path} lacks {", ".join(missing)}: not written by unet_jax.export')
  if metadata['format'] not in FORMATS or metadata['file'] != FORMATS[metadata['format']]:
    raise ExportError(f"{path} names an unknown format/file: {metadata['format']!r}, "
                      f"{metadata['file']!r}")
  model_path = directory / metadata['file']
  if not model_path.is_file():
    raise ExportError(f'{model_path} does not exist, but {path} describes it')
  data = model_path.read_bytes()
  if len(data) != metadata['bytes']:
    raise ExportError(f"{model_path} has {len(data)} bytes, {path} says {metadata['bytes']}: "
                      'the file is truncated, damaged or from another export')
  if hashlib.sha256(data).hexdigest() != metadata['sha256']:
    raise ExportError(f'{model_path} does not match the sha256 in {path}: the file is damaged '
                      'or from another export')
  metadata['path'] = str(model_path)
  return metadata


def _check_onnx_props(model_path: str, props: dict, metadata: dict) -> None:
  for key in ('checkpoint_step', 'config', 'class_names'):
    if key not in props:
      raise ExportError(f'{model_path} carries no {key!r} metadata: not written by unet_jax.export')
    if json.loads(props[key]) != metadata[key]:
      raise ExportError(f'{model_path} and {METADATA_FILE} disagree on {key!r}: they come from '
                        'different exports')


def load_onnx(directory, providers=('CPUExecutionProvider',),
              session_options=None) -> tuple[Callable, dict]:
  """(run, metadata): run(images) -> logits through an ONNX Runtime session
  (`session_options`: an onnxruntime.SessionOptions, or None for the defaults)."""
  import onnxruntime  # pylint: disable=g-import-not-at-top
  metadata = read_metadata(directory)
  if metadata['format'] != 'onnx':
    raise ExportError(f"{metadata['path']} is a {metadata['format']} export, not ONNX")
  try:
    session = onnxruntime.InferenceSession(metadata['path'], sess_options=session_options,
                                           providers=list(providers))
  except Exception as error:  # pylint: disable=broad-except
    raise ExportError(f"{metadata['path']} is not a loadable ONNX model: {error}") from error
  _check_onnx_props(metadata['path'], session.get_modelmeta().custom_metadata_map, metadata)
  input_name = metadata['input']['name']

  def run(images: np.ndarray) -> np.ndarray:
    return session.run(None, {input_name: np.asarray(images, np.float32)})[0]

  run.session = session
  return run, metadata


def load_stablehlo(directory) -> tuple[Callable, dict]:
  """(run, metadata): run(images) -> logits through the deserialized `jax.export` module."""
  from jax import export as jax_export  # pylint: disable=g-import-not-at-top
  metadata = read_metadata(directory)
  if metadata['format'] != 'stablehlo':
    raise ExportError(f"{metadata['path']} is a {metadata['format']} export, not StableHLO")
  try:
    module = jax_export.deserialize(bytearray(pathlib.Path(metadata['path']).read_bytes()))
  except Exception as error:  # pylint: disable=broad-except
    raise ExportError(
        f"{metadata['path']} is not a serialized jax.export module: {error}") from error
  if len(module.in_avals) != 1 or len(module.in_avals[0].shape) != 4:
    raise ExportError(f"{metadata['path']} does not take one NHWC image batch")

  def run(images: np.ndarray) -> np.ndarray:
    return np.asarray(module.call(np.asarray(images, np.float32)))

  run.module = module
  return run, metadata


def load(directory) -> tuple[Callable, dict]:
  """The export in `directory`, whichever its format."""
  metadata = read_metadata(directory)
  return (load_onnx if metadata['format'] == 'onnx' else load_stablehlo)(directory)
