"""Exported models compute what the JAX model computes, and the loader refuses bad files."""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unet_jax import carla_files
from unet_jax import export
from unet_jax import exported
from unet_jax import models

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_NAMES = sorted(p.stem for p in (REPO / 'configs').glob('*.py') if not p.stem.startswith('_'))
STANDARD_OPS = {'Conv', 'ConvTranspose', 'Relu', 'Clip', 'MaxPool', 'Concat', 'Einsum', 'Reshape',
                'Transpose', 'Slice', 'Pad', 'Add', 'Mul', 'Sub', 'Div', 'Max', 'Min', 'Shape',
                'Gather', 'Identity', 'Cast', 'ReduceSum', 'Expand'}


def _needs_onnx():
  pytest.importorskip('onnx')
  pytest.importorskip('onnxruntime')


def tiny_config(name):
  """The config's 'smoke' variant, or the config shrunk where it has none."""
  module = importlib.import_module(f'configs.{name}')
  try:
    config = module.get_config('smoke')
  except ValueError:
    config = module.get_config()
    config.model.base_filters = 4
    config.model.depth = 2
    config.data.image_size = models.smallest_input_for_output((8, 8), 2, config.model.padding)
  return config


def random_variables(config, seed=0):
  """Initial parameters with non-trivial batch-norm statistics (so folding is tested)."""
  model = models.unet_from_config(config.model)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, *config.data.image_size, 3)))
  rng = np.random.default_rng(seed)
  perturb = lambda a, low: np.asarray(a) + rng.uniform(low, 1.0, a.shape).astype(np.float32)
  if 'batch_stats' in variables:
    variables = dict(variables)
    variables['batch_stats'] = jax.tree_util.tree_map_with_path(
        lambda path, a: perturb(a, 0.1 if 'var' in jax.tree_util.keystr(path) else -1.0),
        variables['batch_stats'])
    variables['params'] = jax.tree_util.tree_map_with_path(
        lambda path, a: perturb(a, -0.5) if 'bn' in jax.tree_util.keystr(path) else a,
        variables['params'])
  return jax.tree.map(np.asarray, variables)


def jax_logits(config, variables, images, dtype=None):
  model = models.unet_from_config(config.model)
  if dtype is not None:
    model = model.clone(dtype=dtype)
  return np.asarray(jax.jit(lambda x: model.apply(variables, x, train=False))(images))


def test_size_rule_lists_exactly_the_valid_sizes():
  model_configs = [ml_collections.ConfigDict(dict(encoder='unet', depth=depth, padding=padding))
                   for depth in (2, 3, 4) for padding in ('SAME', 'VALID')]
  model_configs.append(ml_collections.ConfigDict(dict(encoder='efficientnet_lite0', depth=4,
                                                      padding='SAME')))
  for model_config in model_configs:
    scale, offset = export.size_rule(model_config)
    lattice = {scale * k + offset for k in range(1, 6)}
    for length in range(1, max(lattice) + 1):
      try:
        models.label_size(model_config, (length, length))
        valid = True
      except ValueError:
        valid = False
      assert valid == (length in lattice), (model_config, length)


# Every config as it is, and the options that add operators of their own.
EXPORT_CASES = [(name, {}) for name in CONFIG_NAMES] + [
    ('carla_pretrained', {'model.global_context_filters': 4}),  # frame average, broadcast
    ('carla_pretrained', {'model.deep_supervision': 0.5}),  # parameters the graph leaves out
]


@pytest.mark.parametrize('name, overrides', EXPORT_CASES,
                         ids=[name + ''.join(f'-{k}={v}' for k, v in overrides.items())
                              for name, overrides in EXPORT_CASES])
def test_onnx_and_stablehlo_logits_equal_the_jax_models(name, overrides, tmp_path):
  _needs_onnx()
  config = tiny_config(name)
  config.update_from_flattened_dict(overrides)
  variables = random_variables(config)
  for fmt in export.FORMATS:
    export.export_model(config, variables, 7, file_format=fmt, output_dir=tmp_path / fmt)
  onnx_run, onnx_meta = exported.load(tmp_path / 'onnx')
  hlo_run, hlo_meta = exported.load(tmp_path / 'stablehlo')
  assert onnx_meta['input']['dynamic_size'] and hlo_meta['input']['dynamic_size']
  scale, offset = export.size_rule(config.model)
  rng = np.random.default_rng(1)
  # The training size at batch 1, and another size at batch 3 (dynamic axes).
  for shape in ((1, *config.data.image_size), (3, 2 * scale + offset, 3 * scale + offset)):
    images = rng.uniform(0, 1, (*shape, 3)).astype(np.float32)
    want32 = jax_logits(config, variables, images, dtype=jnp.float32)
    scale_of = float(np.abs(want32).max()) + 1e-6
    np.testing.assert_allclose(onnx_run(images), want32, rtol=0, atol=2e-5 * scale_of)
    want = jax_logits(config, variables, images)  # the model's own dtype
    tolerance = 1e-5 if config.model.dtype == 'float32' else 2e-2
    np.testing.assert_allclose(hlo_run(images), want, rtol=0, atol=tolerance * scale_of)

  import onnx  # pylint: disable=g-import-not-at-top
  proto = onnx.load(tmp_path / 'onnx' / 'model.onnx')
  onnx.checker.check_model(proto, full_check=True)
  op_types = [node.op_type for node in proto.graph.node]
  assert set(op_types) <= STANDARD_OPS, set(op_types) - STANDARD_OPS
  # Batch norm and biases folded into the convolutions: no float constant is
  # multiplied, subtracted or divided, and only the 2x2 up-convolutions
  # (an Einsum, then a Reshape) add theirs.
  floats = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
  producer = {out: node.op_type for node in proto.graph.node for out in node.output}
  normalised_input = {'images'}  # the pretrained encoder's input scaling stays (exact at borders)
  for node in proto.graph.node:
    constants = [i for i in node.input if i in floats]
    if node.op_type in ('Sub', 'Div', 'Mul') and set(node.input) & normalised_input:
      normalised_input.update(node.output)
      continue
    if node.op_type in ('Mul', 'Sub', 'Div'):
      assert not constants, node
    if node.op_type == 'Add' and constants:
      assert {producer.get(i) for i in node.input if i not in floats} <= {'Einsum', 'Reshape'}, node
  assert [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim[:3]] == [
      'batch', 'height', 'width']


def test_argmax_masks_agree_on_a_real_frame(shared_carla_dir, tmp_path):
  _needs_onnx()
  config = tiny_config('carla')  # batch norm, dropout in training
  variables = random_variables(config, seed=2)
  frame = sorted((shared_carla_dir / 'CameraRGB').glob('*.png'))[0]
  image = carla_files.read_image(frame)[None].astype(np.float32) / 255.0  # 480x640 native
  want = jax_logits(config, variables, image).argmax(-1)
  for fmt in export.FORMATS:
    export.export_model(config, variables, 1, file_format=fmt, output_dir=tmp_path / fmt)
    run, _ = exported.load(tmp_path / fmt)
    agree = float(np.mean(run(image).argmax(-1) == want))
    assert agree >= 0.9999, (fmt, agree)


_FRESH_PROCESS = r'''
import sys
import numpy as np
from jax import export
module = export.deserialize(bytearray(open(sys.argv[1], 'rb').read()))
np.save(sys.argv[3], np.asarray(module.call(np.load(sys.argv[2]))))
loaded = [m for m in sys.modules if m.startswith(('unet_jax', 'flax', 'configs'))]
assert not loaded, loaded
'''


def test_stablehlo_runs_in_a_fresh_process_without_the_model_code(tmp_path):
  config = tiny_config('carla_lab')  # 3x3 up-convolutions and the extra head
  variables = random_variables(config)
  path = export.export_model(config, variables, 3, file_format='stablehlo', output_dir=tmp_path)
  images = np.random.default_rng(0).uniform(0, 1, (2, 12, 20, 3)).astype(np.float32)
  np.save(tmp_path / 'in.npy', images)
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  subprocess.run([sys.executable, '-c', _FRESH_PROCESS, str(path), str(tmp_path / 'in.npy'),
                  str(tmp_path / 'out.npy')], check=True, cwd=tmp_path, env=env)
  np.testing.assert_allclose(np.load(tmp_path / 'out.npy'), jax_logits(config, variables, images),
                             rtol=0, atol=1e-5)


def test_loader_refuses_damaged_or_mismatched_exports(tmp_path):
  _needs_onnx()
  config = tiny_config('carla')
  variables = random_variables(config)
  for fmt, step in (('onnx', 5), ('stablehlo', 5)):
    export.export_model(config, variables, step, file_format=fmt, output_dir=tmp_path / fmt)
  export.export_model(config, random_variables(config, seed=1), 9, file_format='onnx',
                      output_dir=tmp_path / 'other')
  onnx_dir, model = tmp_path / 'onnx', tmp_path / 'onnx' / 'model.onnx'
  original, metadata_text = model.read_bytes(), (onnx_dir / 'model.json').read_text()

  def refused(directory, *words, loader=exported.load):
    with pytest.raises(exported.ExportError) as error:
      loader(directory)
    assert all(word in str(error.value) for word in words), str(error.value)

  model.write_bytes(original[:len(original) // 2])  # truncated
  refused(onnx_dir, str(model), 'truncated')
  damaged = bytearray(original)
  damaged[len(damaged) // 2] ^= 0xFF
  model.write_bytes(bytes(damaged))  # same size, one byte changed
  refused(onnx_dir, str(model), 'sha256')
  model.write_bytes((tmp_path / 'other' / 'model.onnx').read_bytes())  # another export's model
  refused(onnx_dir, str(model))
  # Another export's model with a model.json rewritten to its hash: the
  # metadata inside the file still names the other checkpoint.
  metadata = json.loads(metadata_text)
  other = json.loads((tmp_path / 'other' / 'model.json').read_text())
  metadata.update(sha256=other['sha256'], bytes=other['bytes'])
  (onnx_dir / 'model.json').write_text(json.dumps(metadata))
  refused(onnx_dir, str(model), 'checkpoint_step', 'different exports')
  (onnx_dir / 'model.json').write_text('{"format": ')
  refused(onnx_dir, 'model.json', 'not valid JSON')
  (onnx_dir / 'model.json').unlink()
  refused(onnx_dir, 'model.json', 'not an export folder')
  # The wrong loader for the format.
  refused(tmp_path / 'stablehlo', 'not ONNX', loader=exported.load_onnx)
  # And the intact folders load.
  model.write_bytes(original)
  (onnx_dir / 'model.json').write_text(metadata_text)
  assert exported.load(onnx_dir)[1]['checkpoint_step'] == 5


def test_the_command_exports_a_trained_workdir(trained, tmp_path):
  _needs_onnx()
  shared = trained
  workdir = shared['workdir']
  env = dict(os.environ, PYTHONPATH=str(REPO))
  subprocess.run([sys.executable, '-m', 'unet_jax.export', f'--workdir={workdir}',
                  '--checkpoint=latest', '--format=onnx', f'--output={tmp_path / "onnx"}'],
                 check=True, cwd=REPO, env=env, capture_output=True)
  export.export_workdir(str(workdir), 'latest', 'stablehlo', str(tmp_path / 'hlo'))
  config, variables, step = export.restore(str(workdir), 'latest')
  images = np.random.default_rng(0).uniform(0, 1, (2, *config.data.image_size, 3)).astype(
      np.float32)
  want = jax_logits(config, variables, images)
  for directory in ('onnx', 'hlo'):
    run, metadata = exported.load(tmp_path / directory)
    assert metadata['checkpoint_step'] == step
    assert metadata['class_names'][7] == 'Road' and metadata['class_colors'][7] == [128, 64, 128]
    assert metadata['config']['model'] == json.loads(config.model.to_json())
    assert metadata['input']['training_size'] == list(config.data.image_size)
    np.testing.assert_allclose(run(images), want, rtol=0, atol=1e-5 * np.abs(want).max())
