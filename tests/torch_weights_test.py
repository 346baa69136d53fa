"""The restricted reader of legacy PyTorch files: values, refusals, damage."""

import collections
import os
import pickle

import numpy as np
import pytest

import legacy_torch_file
from unet_jax import pretrained
from unet_jax import torch_weights


def _hand_built_state():
  shared = legacy_torch_file.Storage('7', np.arange(10, dtype=np.float32))
  return collections.OrderedDict([
      ('a', legacy_torch_file.Tensor(shared, 0, (2, 3), (3, 1))),
      ('a_transposed', legacy_torch_file.Tensor(shared, 0, (3, 2), (1, 3))),
      ('tail', legacy_torch_file.Tensor(shared, 6, (4,), (1,))),
      ('count', legacy_torch_file.tensor(np.array(42, np.int64), '9')),
      ('kernel', legacy_torch_file.tensor(np.array([[1.5, -2.0]], np.float64), '11')),
  ])


def test_hand_built_file_reads_back_with_strides_offsets_and_dtypes(tmp_path, monkeypatch):
  path = tmp_path / 'w.pth'
  legacy_torch_file.write(path, _hand_built_state(), monkeypatch)
  monkeypatch.undo()
  state = torch_weights.load_state_dict(path)
  assert list(state) == ['a', 'a_transposed', 'tail', 'count', 'kernel']
  np.testing.assert_array_equal(state['a'], [[0, 1, 2], [3, 4, 5]])
  np.testing.assert_array_equal(state['a_transposed'], [[0, 3], [1, 4], [2, 5]])
  np.testing.assert_array_equal(state['tail'], [6, 7, 8, 9])
  assert state['a'].dtype == np.float32 and state['count'].dtype == np.int64
  assert state['count'].shape == () and int(state['count']) == 42
  np.testing.assert_array_equal(state['kernel'], [[1.5, -2.0]])
  assert state['kernel'].dtype == np.float64


class _RunsACommand:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def test_a_foreign_global_is_refused_without_running_it(tmp_path, monkeypatch):
  marker = tmp_path / 'ran'
  state = collections.OrderedDict(weight=legacy_torch_file.tensor(np.ones(3, np.float32), '1'),
                                  payload=_RunsACommand(f'touch {marker}'))
  path = tmp_path / 'evil.pth'
  legacy_torch_file.write(path, state, monkeypatch)
  monkeypatch.undo()
  with pytest.raises(torch_weights.TorchWeightsError,
                     match=r'evil\.pth: refused to load the global (os|posix)\.system'):
    torch_weights.load_state_dict(path)
  assert not marker.exists()


def test_a_foreign_global_in_a_plain_record_is_refused(tmp_path):
  path = tmp_path / 'evil.pth'
  path.write_bytes(pickle.dumps(_RunsACommand('true'), protocol=2))
  with pytest.raises(torch_weights.TorchWeightsError, match=r'refused to load the global'):
    torch_weights.load_state_dict(path)


def test_damaged_missing_and_foreign_files_are_named(tmp_path, monkeypatch):
  path = tmp_path / 'w.pth'
  legacy_torch_file.write(path, _hand_built_state(), monkeypatch)
  monkeypatch.undo()
  data = path.read_bytes()
  (tmp_path / 'short.pth').write_bytes(data[:-5])
  with pytest.raises(torch_weights.TorchWeightsError, match=r'short\.pth: storage .* truncated'):
    torch_weights.load_state_dict(tmp_path / 'short.pth')
  (tmp_path / 'cut.pth').write_bytes(data[:200])
  with pytest.raises(torch_weights.TorchWeightsError, match=r'cut\.pth: damaged'):
    torch_weights.load_state_dict(tmp_path / 'cut.pth')
  with pytest.raises(torch_weights.TorchWeightsError, match=r'absent\.pth: cannot read'):
    torch_weights.load_state_dict(tmp_path / 'absent.pth')
  (tmp_path / 'zip.pth').write_bytes(b'PK\x03\x04' + bytes(100))
  with pytest.raises(torch_weights.TorchWeightsError, match=r'zip\.pth: a zip-format'):
    torch_weights.load_state_dict(tmp_path / 'zip.pth')
  (tmp_path / 'text.pth').write_bytes(b'hello')
  with pytest.raises(torch_weights.TorchWeightsError, match=r'text\.pth'):
    torch_weights.load_state_dict(tmp_path / 'text.pth')


def test_the_packaged_weights_read_as_torch_reads_them():
  torch = pytest.importorskip('torch')
  try:
    path = pretrained.weights_path()
  except pretrained.PretrainedWeightsError as error:
    pytest.skip(str(error))
  ours = torch_weights.load_state_dict(path)
  theirs = torch.load(path, weights_only=True)
  assert list(ours) == list(theirs) and len(ours) == 296
  for name, value in theirs.items():
    assert ours[name].dtype == value.numpy().dtype, name
    np.testing.assert_array_equal(ours[name], value.numpy(), err_msg=name)
  assert sum(v.size for v in ours.values()) == 4_694_073
