"""Reads a PyTorch state dict of the legacy (non-zip) format without PyTorch.

`torch.save(..., _use_new_zipfile_serialization=False)` writes five records
one after the other: four pickles (a magic number, the protocol version, the
writer's type sizes, the object itself) and a pickle of the storage keys,
followed by each storage's raw data (a little-endian int64 element count,
then the elements). Tensors in the object pickle are calls of
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`, whose
storages are persistent ids ('storage', storage type, key, device, count,
view).

The reader unpickles with a `find_class` that admits only those tensor
rebuild entries, the storage types and `collections.OrderedDict`: any other
global (a function, a class of any module) is refused with an error naming
the file and the global, before anything it names is called. Tensors come
back as numpy arrays; nothing is imported from torch.
"""

import collections
import dataclasses
import io
import os
import pickle

import numpy as np

LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES = {
    'FloatStorage': np.float32,
    'DoubleStorage': np.float64,
    'HalfStorage': np.float16,
    'LongStorage': np.int64,
    'IntStorage': np.int32,
    'ShortStorage': np.int16,
    'CharStorage': np.int8,
    'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class TorchWeightsError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  key: str
  dtype: np.dtype
  count: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  storage: _StorageRef
  offset: int
  shape: tuple
  stride: tuple


def _rebuild_tensor(storage, offset, shape, stride, *unused):
  """Stands in for torch._utils._rebuild_tensor_v2: records where the data lie."""
  del unused  # requires_grad, backward hooks, metadata
  if not isinstance(storage, _StorageRef):
    raise pickle.UnpicklingError('a tensor whose storage is not a storage record')
  return _TensorRef(storage, int(offset), tuple(int(n) for n in shape),
                    tuple(int(n) for n in stride))


def _allowed_globals() -> dict:
  allowed = {('collections', 'OrderedDict'): collections.OrderedDict,
             ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor}
  for name in STORAGE_DTYPES:
    allowed[('torch', name)] = _StorageType(name)
  return allowed


class _RestrictedUnpickler(pickle.Unpickler):
  """Admits only the globals of a tensor state dict; storages become records."""

  def __init__(self, file, path: str, allow_globals: bool = True):
    super().__init__(file)
    self._path = path
    self._allowed = _allowed_globals() if allow_globals else {}
    self.storages: dict[str, _StorageRef] = {}

  def find_class(self, module, name):
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise TorchWeightsError(
          f'{self._path}: refused to load the global {module}.{name}; a weights file may '
          'only hold tensors (it could run code when loaded)') from None

  def persistent_load(self, pid):
    # ('storage', storage type, key, device, element count, view): views of
    # storages (a non-None last field) came from PyTorch before 1.0 and are not read.
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType) and isinstance(pid[4], int)
            and pid[5] is None):
      raise TorchWeightsError(f'{self._path}: unsupported storage record {pid!r:.80}')
    _, storage_type, key, _, count, _ = pid
    storage = _StorageRef(str(key), np.dtype(STORAGE_DTYPES[storage_type.name]), count)
    if self.storages.setdefault(storage.key, storage) != storage:
      raise TorchWeightsError(f'{self._path}: storage {key} is declared twice differently')
    return storage


def _read_legacy(stream, path: str) -> dict:
  def plain_pickle():
    return _RestrictedUnpickler(stream, path, allow_globals=False).load()

  if plain_pickle() != LEGACY_MAGIC:
    raise TorchWeightsError(f'{path}: not a PyTorch file of the legacy format (wrong magic number)')
  protocol = plain_pickle()
  if protocol != LEGACY_PROTOCOL:
    raise TorchWeightsError(f'{path}: unsupported legacy protocol version {protocol!r}')
  plain_pickle()  # the writer's type sizes
  unpickler = _RestrictedUnpickler(stream, path)
  state = unpickler.load()
  keys = plain_pickle()
  if not isinstance(keys, list) or set(keys) != set(unpickler.storages):
    raise TorchWeightsError(f'{path}: the storage list does not match the tensors')
  data = {}
  for key in keys:
    storage = unpickler.storages[key]
    header = stream.read(8)
    count = int.from_bytes(header, 'little', signed=True) if len(header) == 8 else -1
    if count != storage.count:
      raise TorchWeightsError(f'{path}: storage {key} holds {count} elements, expected '
                              f'{storage.count} (truncated or damaged file)')
    nbytes = count * storage.dtype.itemsize
    raw = stream.read(nbytes)
    if len(raw) != nbytes:
      raise TorchWeightsError(f'{path}: storage {key} is truncated ({len(raw)} of {nbytes} bytes)')
    data[key] = np.frombuffer(raw, storage.dtype)
  if not isinstance(state, dict):
    raise TorchWeightsError(f'{path}: holds a {type(state).__name__}, not a state dict')
  return {name: _materialize(tensor, data, path, name) for name, tensor in state.items()}


def _materialize(tensor, data, path: str, name) -> np.ndarray:
  if not isinstance(tensor, _TensorRef):
    raise TorchWeightsError(f'{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor')
  flat = data[tensor.storage.key]
  itemsize = flat.dtype.itemsize
  extent = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride)) + 1
  if any(n == 0 for n in tensor.shape):
    return np.zeros(tensor.shape, flat.dtype)
  if tensor.offset < 0 or any(s < 0 for s in tensor.stride) or extent > flat.size:
    raise TorchWeightsError(f'{path}: entry {name!r} lies outside its storage')
  view = np.lib.stride_tricks.as_strided(
      flat[tensor.offset:], tensor.shape, tuple(s * itemsize for s in tensor.stride),
      writeable=False)
  return np.array(view)  # own, contiguous, native


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a legacy-format PyTorch state dict file, as numpy arrays.

  Raises TorchWeightsError (naming the file) for a missing, damaged or
  foreign file, and for any global other than the tensor-rebuild entries.
  """
  path = os.fspath(path)
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except OSError as error:
    raise TorchWeightsError(f'{path}: cannot read the weights file: {error.strerror}') from None
  if raw[:4] == b'PK\x03\x04':
    raise TorchWeightsError(f'{path}: a zip-format PyTorch file; only the legacy format is read')
  try:
    return _read_legacy(io.BytesIO(raw), path)
  except TorchWeightsError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
          AttributeError, MemoryError) as error:
    raise TorchWeightsError(f'{path}: damaged or not a PyTorch state dict ({error!r:.120})') \
        from None
