"""Writes files in PyTorch's legacy serialization without PyTorch, for tests.

The layout of `torch.save(..., _use_new_zipfile_serialization=False)`: four
pickles (magic number, protocol version, type sizes, the object), a pickle of
the storage keys, then each storage as an int64 element count and its raw
little-endian data. Tensors pickle as calls of
torch._utils._rebuild_tensor_v2 on a persistent storage id; stand-in modules
named `torch` and `torch._utils` let the standard pickler write those
globals (the reader never imports them).
"""

import collections
import pickle
import sys
import types

import numpy as np

STORAGE_NAMES = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.int64): 'LongStorage',
                 np.dtype(np.float64): 'DoubleStorage', np.dtype(np.int32): 'IntStorage'}


class Storage:
  def __init__(self, key: str, data: np.ndarray):
    self.key, self.data = key, np.ascontiguousarray(data).ravel()


class Tensor:
  """A view of a Storage: pickles as _rebuild_tensor_v2(storage, offset, shape, stride, ...)."""

  def __init__(self, storage: Storage, offset: int, shape, stride):
    self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)

  def __reduce__(self):
    return (sys.modules['torch._utils']._rebuild_tensor_v2,
            (self.storage, self.offset, self.shape, self.stride, False,
             collections.OrderedDict()))


def tensor(array: np.ndarray, key: str) -> Tensor:
  """A contiguous tensor with its own storage."""
  array = np.array(array, order='C')  # (ascontiguousarray would make a 0-d array 1-d)
  strides = tuple(s // array.itemsize for s in array.strides)
  return Tensor(Storage(key, array), 0, array.shape, strides)


def _fake_torch_modules(monkeypatch):
  torch = types.ModuleType('torch')
  utils = types.ModuleType('torch._utils')

  def _rebuild_tensor_v2(*args):
    raise AssertionError('never called while writing')

  _rebuild_tensor_v2.__module__ = 'torch._utils'
  _rebuild_tensor_v2.__qualname__ = '_rebuild_tensor_v2'
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  torch._utils = utils
  for name in STORAGE_NAMES.values():
    setattr(torch, name, type(name, (), {'__module__': 'torch'}))
  monkeypatch.setitem(sys.modules, 'torch', torch)
  monkeypatch.setitem(sys.modules, 'torch._utils', utils)
  return torch


def write(path, state, monkeypatch) -> None:
  """Writes `state` (an object holding Tensors) in the legacy format."""
  torch = _fake_torch_modules(monkeypatch)
  storages = {}

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, Storage):
        storages.setdefault(obj.key, obj)
        storage_type = getattr(torch, STORAGE_NAMES[obj.data.dtype])
        return ('storage', storage_type, obj.key, 'cpu', obj.data.size, None)
      return None

  with open(path, 'wb') as f:
    pickle.dump(0x1950a86a20f9469cfc6c, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump({'protocol_version': 1001, 'little_endian': True,
                 'type_sizes': {'short': 2, 'int': 4, 'long': 4}}, f, protocol=2)
    Pickler(f, protocol=2).dump(state)
    pickle.dump(list(storages), f, protocol=2)
    for storage in storages.values():
      f.write(np.int64(storage.data.size).astype('<i8').tobytes())
      f.write(storage.data.astype(storage.data.dtype.newbyteorder('<')).tobytes())
