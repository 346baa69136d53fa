"""Writes a JAX inference function as an ONNX graph of standard operators.

    model = onnx_graph.to_onnx(fn, jax.ShapeDtypeStruct(shape, jnp.float32))

The function is traced to a jaxpr with its variables closed over as
constants, and each primitive is mapped onto ONNX operators, so a new layer
built from known primitives needs no change here; an unknown primitive is
refused by name. Along the way:

* every equation whose inputs are all constants is evaluated once (its
  primitive bound on numpy values), so weight transforms vanish;
* batch norm and biases (per-channel multiplies and adds after a
  convolution) are folded into the convolution's weights and bias;
* layouts are tracked rather than transposed: JAX's NHWC tensors live in
  ONNX in the NCHW order that Conv wants, and a Transpose is written only
  where an operator needs another order (a reshape);
* a 2x2 max pooling written as reshape + max becomes MaxPool, a transposed
  convolution (lhs dilation) becomes ConvTranspose;
* symbolic dimensions (`jax.export.symbolic_shape`) become dynamic ONNX
  axes; shapes that depend on them are computed in the graph from the
  input's Shape.
"""

from collections.abc import Callable, Sequence
import dataclasses

import jax
from jax.extend import core as jex_core
import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper

OPSET = 17

_DTYPES = {
    np.dtype(np.float32): onnx.TensorProto.FLOAT,
    np.dtype(np.float64): onnx.TensorProto.DOUBLE,
    np.dtype(np.float16): onnx.TensorProto.FLOAT16,
    np.dtype(np.int32): onnx.TensorProto.INT32,
    np.dtype(np.int64): onnx.TensorProto.INT64,
    np.dtype(np.uint8): onnx.TensorProto.UINT8,
    np.dtype(np.bool_): onnx.TensorProto.BOOL,
}

_ELEMENTWISE = {  # jax primitive -> ONNX operator with numpy broadcasting
    'add': 'Add', 'sub': 'Sub', 'mul': 'Mul', 'div': 'Div', 'max': 'Max', 'min': 'Min',
    'pow': 'Pow',
}
_UNARY = {
    'neg': 'Neg', 'exp': 'Exp', 'log': 'Log', 'tanh': 'Tanh', 'logistic': 'Sigmoid',
    'sqrt': 'Sqrt', 'abs': 'Abs', 'erf': 'Erf', 'floor': 'Floor', 'ceil': 'Ceil',
}
_INLINED = ('custom_jvp_call', 'custom_vjp_call', 'pjit', 'jit', 'closed_call', 'remat',
            'checkpoint')


class UnsupportedError(ValueError):
  """The function uses something that has no ONNX mapping here."""


# --------------------------------------------------------------------------
# Values: what a jaxpr variable is while the graph is written.


@dataclasses.dataclass
class Const:
  """A value known now. Its shape may have 1s where the variable's shape is
  larger (a broadcast not yet done): every consumer broadcasts it."""
  array: np.ndarray


@dataclasses.dataclass
class Tensor:
  """An ONNX tensor holding the logical (JAX) array transposed by `perm`:
  ONNX axis i is logical axis perm[i]."""
  name: str
  perm: tuple[int, ...]


@dataclasses.dataclass
class PendingConv:
  """A Conv/ConvTranspose not yet written, so that following per-channel
  multiplies and adds can still be folded into its weights and bias."""
  op_type: str
  x: str
  weight: np.ndarray
  bias: np.ndarray
  attributes: dict
  perm: tuple[int, ...]


@dataclasses.dataclass
class PendingReshape:
  """A reshape not yet written: a max over its split axes becomes MaxPool."""
  source: object
  in_shape: tuple
  out_shape: tuple


class _Dim:
  """A dimension only known at run time: an int64 ONNX tensor of shape [1].
  Supports the arithmetic of `jax.export` dimension expressions."""
  __array_ufunc__ = None  # numpy integers defer to the reflected operators

  def __init__(self, graph: '_Graph', name: str):
    self.graph, self.name = graph, name

  def _binary(self, op_type, other, reverse=False):
    other_name = other.name if isinstance(other, _Dim) else self.graph.constant(
        np.array([int(other)], np.int64))
    inputs = [other_name, self.name] if reverse else [self.name, other_name]
    return _Dim(self.graph, self.graph.node(op_type, inputs))

  __add__ = lambda self, o: self._binary('Add', o)
  __radd__ = lambda self, o: self._binary('Add', o, True)
  __sub__ = lambda self, o: self._binary('Sub', o)
  __rsub__ = lambda self, o: self._binary('Sub', o, True)
  __mul__ = lambda self, o: self._binary('Mul', o)
  __rmul__ = lambda self, o: self._binary('Mul', o, True)
  # Dimensions are non-negative: integer Div is floor division.
  __floordiv__ = lambda self, o: self._binary('Div', o)
  __rfloordiv__ = lambda self, o: self._binary('Div', o, True)
  __mod__ = lambda self, o: self._binary('Mod', o)

  def __divmod__(self, other):
    return self // other, self % other


def _is_symbolic(dim) -> bool:
  return not isinstance(dim, (int, np.integer))


# --------------------------------------------------------------------------
# The graph being written.


class _Graph:
  """Nodes, initializers and names; values are created through it."""

  def __init__(self):
    self.nodes, self.initializers = [], []
    self._count = 0
    self._constants = {}
    self._dims = {}
    self.dim_env = {}  # dimension variable -> _Dim

  def fresh(self, hint: str) -> str:
    self._count += 1
    return f'{hint}_{self._count}'

  def node(self, op_type: str, inputs: Sequence[str], **attributes) -> str:
    output = self.fresh(op_type.lower())
    self.nodes.append(helper.make_node(op_type, list(inputs), [output], **attributes))
    return output

  def constant(self, array: np.ndarray, hint: str = 'const') -> str:
    array = np.asarray(array)
    key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 16 else None
    if key is not None and key in self._constants:
      return self._constants[key]
    name = self.fresh(hint)
    self.initializers.append(numpy_helper.from_array(array, name))
    if key is not None:
      self._constants[key] = name
    return name

  def dim(self, size) -> str:
    """An int64 [1] tensor holding a (possibly symbolic) dimension."""
    if not _is_symbolic(size):
      return self.constant(np.array([int(size)], np.int64))
    key = str(size)
    if key not in self._dims:
      value = size._evaluate(self.dim_env)  # pylint: disable=protected-access
      self._dims[key] = value.name if isinstance(value, _Dim) else self.constant(
          np.array([int(value)], np.int64))
    return self._dims[key]

  def shape(self, sizes: Sequence) -> str:
    if not any(_is_symbolic(s) for s in sizes):
      return self.constant(np.array([int(s) for s in sizes], np.int64))
    return self.node('Concat', [self.dim(s) for s in sizes], axis=0)

  # ---- values -> ONNX tensors ----

  def tensor(self, value, perm: tuple[int, ...] | None = None, shape=None) -> str:
    """The ONNX name of `value` in layout `perm` (default: its own or identity)."""
    value = self.materialize(value, shape)
    if isinstance(value, Const):
      array = value.array
      if perm is not None and array.ndim == len(perm):
        array = np.transpose(array, perm)
      return self.constant(np.ascontiguousarray(array))
    if perm is None or tuple(perm) == value.perm or not value.perm:  # scalars broadcast
      return value.name
    # ONNX axis i must hold logical perm[i]; the tensor's axis j holds value.perm[j].
    order = [value.perm.index(axis) for axis in perm]
    return self.node('Transpose', [value.name], perm=order)

  def materialize(self, value, shape=None):
    """Writes pending work; returns a Const or a Tensor."""
    if isinstance(value, PendingConv):
      inputs = [value.x, self.constant(value.weight.astype(np.float32), 'weight'),
                self.constant(value.bias.astype(np.float32), 'bias')]
      return Tensor(self.node(value.op_type, inputs, **value.attributes), value.perm)
    if isinstance(value, PendingReshape):
      source = self.tensor(value.source, tuple(range(len(value.in_shape))))
      return Tensor(self.node('Reshape', [source, self.shape(value.out_shape)]),
                    tuple(range(len(value.out_shape))))
    return value


# --------------------------------------------------------------------------
# Rules: one per primitive. Each takes (graph, eqn, values) and returns values.


def _per_channel(array: np.ndarray, rank: int, perm: tuple[int, ...], channels: int):
  """The per-output-channel vector of a constant in ONNX layout (N, C, ...), or None."""
  if array.ndim == 0:
    return np.full(channels, array, np.float64)
  if array.ndim != rank:
    return None
  array = np.transpose(array, perm)
  if (any(n != 1 for i, n in enumerate(array.shape) if i != 1)
      or array.shape[1] not in (1, channels)):
    return None
  return np.broadcast_to(array.reshape(-1), (channels,)).astype(np.float64)


def _fold_into_conv(conv: PendingConv, name: str, const: np.ndarray, rank: int):
  channel_axis = 0 if conv.op_type == 'Conv' else 1
  channels = conv.weight.shape[channel_axis]
  vector = _per_channel(const, rank, conv.perm, channels)
  if vector is None:
    return None
  weight, bias = conv.weight.astype(np.float64), conv.bias.astype(np.float64)
  if name == 'mul':
    shape = [1] * weight.ndim
    shape[channel_axis] = channels
    weight, bias = weight * vector.reshape(shape), bias * vector
  elif name == 'add':
    bias = bias + vector
  elif name == 'sub':
    bias = bias - vector
  else:
    return None
  return dataclasses.replace(conv, weight=weight, bias=bias)


def _elementwise(graph, eqn, values, foldable):
  name = eqn.primitive.name
  a, b = values
  rank = len(eqn.outvars[0].aval.shape)
  # Per-channel constants after a convolution go into its weights.
  if isinstance(a, PendingConv) and isinstance(b, Const) and foldable[0]:
    folded = _fold_into_conv(a, name, b.array, rank)
    if folded is not None:
      return [folded]
  if isinstance(b, PendingConv) and isinstance(a, Const) and foldable[1] and name in ('add', 'mul'):
    folded = _fold_into_conv(b, name, a.array, rank)
    if folded is not None:
      return [folded]
  if name == 'max':  # max(x, 0) is Relu
    for x, other in ((a, b), (b, a)):
      if isinstance(other, Const) and not isinstance(x, Const) and not np.any(other.array):
        x = graph.materialize(x)
        return [Tensor(graph.node('Relu', [x.name]), x.perm)]
  tensors = [graph.materialize(v) for v in values]
  perm = next((t.perm for t in tensors if isinstance(t, Tensor) and len(t.perm) == rank),
              tuple(range(rank)))
  inputs = [graph.tensor(t, perm) for t in tensors]
  return [Tensor(graph.node(_ELEMENTWISE[name], inputs), perm)]


def _unary(graph, eqn, values, foldable):
  del foldable
  x = graph.materialize(values[0])
  name = eqn.primitive.name
  if name == 'rsqrt':
    out = graph.node('Reciprocal', [graph.node('Sqrt', [x.name])])
  elif name == 'square':
    out = graph.node('Mul', [x.name, x.name])
  elif name == 'integer_pow':
    exponent = graph.constant(np.array(eqn.params['y'], np.float32))
    out = graph.node('Pow', [x.name, exponent])
  elif name in ('copy', 'copy_p', 'optimization_barrier', 'reduce_precision'):
    return [x]
  else:
    out = graph.node(_UNARY[name], [x.name])
  return [Tensor(out, x.perm)]


def _convert_element_type(graph, eqn, values, foldable):
  del foldable
  x = graph.materialize(values[0])
  dtype = np.dtype(eqn.params['new_dtype'])
  if dtype == np.dtype(eqn.invars[0].aval.dtype):
    return [x]
  if dtype not in _DTYPES:
    raise UnsupportedError(f'conversion to {dtype}: export the model in float32')
  return [Tensor(graph.node('Cast', [x.name], to=_DTYPES[dtype]), x.perm)]


def _clamp(graph, eqn, values, foldable):
  del eqn, foldable
  low, x, high = values
  if not (isinstance(low, Const) and isinstance(high, Const)):
    raise UnsupportedError('clamp with non-constant bounds')
  x = graph.materialize(x)
  bounds = [graph.constant(np.asarray(b.array, np.float32).reshape(())) for b in (low, high)]
  return [Tensor(graph.node('Clip', [x.name, *bounds]), x.perm)]


def _conv(graph, eqn, values, foldable):
  del foldable
  params = eqn.params
  lhs_spec, rhs_spec, out_spec = params['dimension_numbers']
  if params['batch_group_count'] != 1:
    raise UnsupportedError('convolution with batch_group_count > 1')
  x, kernel = values
  if not isinstance(kernel, Const):
    raise UnsupportedError('convolution with a kernel computed from the input')
  spatial = len(lhs_spec) - 2
  x_name = graph.tensor(x, tuple(lhs_spec))
  # ONNX Conv weight: (out, in / groups, *spatial).
  weight = np.transpose(np.broadcast_to(kernel.array, eqn.invars[1].aval.shape), rhs_spec)
  padding = [tuple(int(p) for p in pair) for pair in params['padding']]
  groups = params['feature_group_count']
  dilation = [int(d) for d in params['rhs_dilation']]
  if all(d == 1 for d in params['lhs_dilation']):
    if any(p < 0 for pair in padding for p in pair):
      raise UnsupportedError('convolution with negative padding')
    attributes = dict(strides=[int(s) for s in params['window_strides']], dilations=dilation,
                      pads=[p[0] for p in padding] + [p[1] for p in padding], group=groups)
    out_channels, op_type = weight.shape[0], 'Conv'
  else:
    # A convolution of the input dilated by s is a transposed convolution
    # with stride s: ONNX wants the flipped kernel as (in, out) and the
    # padding that the dilated convolution does not add.
    if groups != 1 or any(s != 1 for s in params['window_strides']):
      raise UnsupportedError('input-dilated convolution with groups or strides')
    weight = np.flip(np.swapaxes(weight, 0, 1), axis=tuple(range(2, 2 + spatial)))
    extent = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    begin = [e - p[0] for e, p in zip(extent, padding)]
    end = [e - p[1] for e, p in zip(extent, padding)]
    if any(b < 0 for b in begin):
      raise UnsupportedError('input-dilated convolution padded beyond its kernel')
    attributes = dict(strides=[int(s) for s in params['lhs_dilation']], dilations=dilation,
                      pads=begin + [max(e, 0) for e in end],
                      output_padding=[max(-e, 0) for e in end])
    out_channels, op_type = weight.shape[1], 'ConvTranspose'
  bias = np.zeros(out_channels, np.float64)
  return [PendingConv(op_type, x_name, weight, bias, attributes, tuple(out_spec))]


def _dot_general(graph, eqn, values, foldable):
  del foldable
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params['dimension_numbers']
  lhs, rhs = [graph.materialize(v) for v in values]
  lhs_rank, rhs_rank = (len(v.aval.shape) for v in eqn.invars)
  letters = iter('abcdefghijklmnopqrstuvwxyz')
  lhs_letters = [next(letters) for _ in range(lhs_rank)]
  rhs_letters = [None] * rhs_rank
  for i, j in zip(lhs_contract, rhs_contract):
    rhs_letters[j] = lhs_letters[i]
  for i, j in zip(lhs_batch, rhs_batch):
    rhs_letters[j] = lhs_letters[i]
  rhs_letters = [l or next(letters) for l in rhs_letters]
  out = ([lhs_letters[i] for i in lhs_batch]
         + [l for i, l in enumerate(lhs_letters) if i not in lhs_contract and i not in lhs_batch]
         + [l for j, l in enumerate(rhs_letters) if j not in rhs_contract and j not in rhs_batch])

  def operand(value, letters_, rank):
    if isinstance(value, Const):
      shape = eqn.invars[0 if value is lhs else 1].aval.shape
      return graph.constant(np.ascontiguousarray(np.broadcast_to(value.array, shape))), letters_
    return value.name, [letters_[axis] for axis in value.perm]

  lhs_name, lhs_in = operand(lhs, lhs_letters, lhs_rank)
  rhs_name, rhs_in = operand(rhs, rhs_letters, rhs_rank)
  equation = f"{''.join(lhs_in)},{''.join(rhs_in)}->{''.join(out)}"
  return [Tensor(graph.node('Einsum', [lhs_name, rhs_name], equation=equation),
                 tuple(range(len(out))))]


def _transpose(graph, eqn, values, foldable):
  del foldable
  permutation = tuple(eqn.params['permutation'])
  x = graph.materialize(values[0])
  if isinstance(x, Const):
    return [Const(np.transpose(x.array, permutation))]
  # Logical axis k of the input is logical axis permutation.index(k) of the output.
  return [Tensor(x.name, tuple(permutation.index(axis) for axis in x.perm))]


def _reshape(graph, eqn, values, foldable):
  del foldable
  in_shape = tuple(eqn.invars[0].aval.shape)
  out_shape = tuple(eqn.outvars[0].aval.shape)
  x = values[0]
  if isinstance(x, Const):
    return [Const(np.broadcast_to(x.array, in_shape).reshape(out_shape))]
  return [PendingReshape(x, in_shape, out_shape)]


def _as_max_pool(graph, pending: PendingReshape, axes):
  """MaxPool for NHWC (n, h, w, c) -> (n, h/a, a, w/b, b, c) reduced over (2, 4)."""
  in_shape, out_shape = pending.in_shape, pending.out_shape
  if len(in_shape) != 4 or len(out_shape) != 6 or tuple(sorted(axes)) != (2, 4):
    return None
  if _is_symbolic(out_shape[2]) or _is_symbolic(out_shape[4]):
    return None
  same = lambda p, q: str(p) == str(q)
  if not (same(out_shape[0], in_shape[0]) and same(out_shape[5], in_shape[3])
          and same(out_shape[1] * out_shape[2], in_shape[1])
          and same(out_shape[3] * out_shape[4], in_shape[2])):
    return None
  kernel = [int(out_shape[2]), int(out_shape[4])]
  nchw = (0, 3, 1, 2)
  x = graph.tensor(pending.source, nchw)
  return Tensor(graph.node('MaxPool', [x], kernel_shape=kernel, strides=kernel), nchw)


def _reduce(graph, eqn, values, foldable):
  del foldable
  axes = tuple(eqn.params['axes'])
  x = values[0]
  if eqn.primitive.name == 'reduce_max' and isinstance(x, PendingReshape):
    pooled = _as_max_pool(graph, x, axes)
    if pooled is not None:
      return [pooled]
  x = graph.materialize(x)
  op_type = {'reduce_max': 'ReduceMax', 'reduce_min': 'ReduceMin',
             'reduce_sum': 'ReduceSum'}[eqn.primitive.name]
  onnx_axes = [x.perm.index(a) for a in axes]
  kept = [a for a in x.perm if a not in axes]
  # The remaining logical axes are renumbered in order.
  perm = tuple(sorted(kept).index(a) for a in kept)
  if op_type == 'ReduceSum':
    out = graph.node(op_type, [x.name, graph.constant(np.array(onnx_axes, np.int64))], keepdims=0)
  else:
    out = graph.node(op_type, [x.name], axes=onnx_axes, keepdims=0)
  return [Tensor(out, perm)]


def _reshape_like(graph, eqn, values, foldable):
  """squeeze / expand_dims: a reshape to the output's shape."""
  del foldable
  x = graph.materialize(values[0])
  out_shape = tuple(eqn.outvars[0].aval.shape)
  if isinstance(x, Const):
    return [Const(np.broadcast_to(x.array, eqn.invars[0].aval.shape).reshape(out_shape))]
  return [PendingReshape(x, tuple(eqn.invars[0].aval.shape), out_shape)]


def _broadcast_in_dim(graph, eqn, values, foldable):
  del foldable
  out_shape = tuple(eqn.outvars[0].aval.shape)
  dims = eqn.params['broadcast_dimensions']
  x = graph.materialize(values[0])
  in_shape = tuple(eqn.invars[0].aval.shape)
  kept_shape = [1] * len(out_shape)
  for i, d in enumerate(dims):
    kept_shape[d] = in_shape[i]
  if isinstance(x, Const):  # left to the consumers' broadcasting
    return [Const(np.asarray(x.array).reshape([int(n) for n in kept_shape]))]
  source = graph.tensor(x, tuple(range(len(in_shape))))
  reshaped = graph.node('Reshape', [source, graph.shape(kept_shape)])
  expanded = graph.node('Expand', [reshaped, graph.shape(out_shape)])
  return [Tensor(expanded, tuple(range(len(out_shape))))]


def _concatenate(graph, eqn, values, foldable):
  del foldable
  axis = eqn.params['dimension']
  tensors = [graph.materialize(v) for v in values]
  rank = len(eqn.outvars[0].aval.shape)
  perm = next((t.perm for t in tensors if isinstance(t, Tensor)), tuple(range(rank)))
  inputs = []
  for tensor, var in zip(tensors, eqn.invars):
    if isinstance(tensor, Const):
      if any(_is_symbolic(n) for n in var.aval.shape):
        raise UnsupportedError('concatenation of a constant along a dynamic shape')
      tensor = Const(np.broadcast_to(tensor.array, var.aval.shape))
    inputs.append(graph.tensor(tensor, perm))
  return [Tensor(graph.node('Concat', inputs, axis=perm.index(axis)), perm)]


def _slice(graph, eqn, values, foldable):
  del foldable
  x = graph.materialize(values[0])
  starts, limits = eqn.params['start_indices'], eqn.params['limit_indices']
  strides = eqn.params['strides'] or (1,) * len(starts)
  order = x.perm
  inputs = [x.name,
            graph.shape([starts[a] for a in order]),
            graph.shape([limits[a] for a in order]),
            graph.constant(np.arange(len(order), dtype=np.int64)),
            graph.constant(np.array([strides[a] for a in order], np.int64))]
  return [Tensor(graph.node('Slice', inputs), x.perm)]


def _pad(graph, eqn, values, foldable):
  del foldable
  x, value = values
  config = eqn.params['padding_config']
  if any(interior for _, _, interior in config):
    raise UnsupportedError('pad with interior padding')
  if not isinstance(value, Const):
    raise UnsupportedError('pad with a non-constant padding value')
  x = graph.materialize(x)
  order = x.perm
  pads = graph.shape([config[a][0] for a in order] + [config[a][1] for a in order])
  fill = graph.constant(np.asarray(value.array, eqn.invars[0].aval.dtype).reshape(()))
  return [Tensor(graph.node('Pad', [x.name, pads, fill]), x.perm)]


def _rev(graph, eqn, values, foldable):
  del foldable
  x = graph.materialize(values[0])
  dims = eqn.params['dimensions']
  order = x.perm
  axes = [order.index(d) for d in dims]
  big = np.iinfo(np.int64).max
  inputs = [x.name, graph.constant(np.full(len(axes), -1, np.int64)),
            graph.constant(np.full(len(axes), -big, np.int64)),
            graph.constant(np.array(axes, np.int64)),
            graph.constant(np.full(len(axes), -1, np.int64))]
  return [Tensor(graph.node('Slice', inputs), x.perm)]


_RULES: dict[str, Callable] = {
    **{name: _elementwise for name in _ELEMENTWISE},
    **{name: _unary for name in (*_UNARY, 'rsqrt', 'square', 'integer_pow', 'copy', 'copy_p',
                                 'optimization_barrier', 'reduce_precision')},
    'convert_element_type': _convert_element_type,
    'clamp': _clamp,
    'conv_general_dilated': _conv,
    'dot_general': _dot_general,
    'transpose': _transpose,
    'reshape': _reshape,
    'squeeze': _reshape_like,
    'expand_dims': _reshape_like,
    'reduce_max': _reduce,
    'reduce_min': _reduce,
    'reduce_sum': _reduce,
    'broadcast_in_dim': _broadcast_in_dim,
    'concatenate': _concatenate,
    'slice': _slice,
    'pad': _pad,
    'rev': _rev,
}


# --------------------------------------------------------------------------
# Walking the jaxpr.


def _inner_jaxpr(eqn):
  for key in ('call_jaxpr', 'jaxpr', 'fun_jaxpr'):
    if key in eqn.params:
      inner = eqn.params[key]
      return inner if isinstance(inner, jex_core.ClosedJaxpr) else jex_core.ClosedJaxpr(inner, ())
  raise UnsupportedError(f'{eqn.primitive.name} without an inner jaxpr')


def _dim_as_value(graph, eqn):
  dim, dtype = eqn.params['dim'], np.dtype(eqn.outvars[0].aval.dtype)
  if not _is_symbolic(dim):
    return Const(np.array(dim, dtype))
  scalar = graph.node('Reshape', [graph.dim(dim), graph.constant(np.zeros(0, np.int64))])
  return Tensor(graph.node('Cast', [scalar], to=_DTYPES[dtype]), ())


def _fold_constants(eqn, arrays):
  shapes = [v.aval.shape for v in eqn.invars]
  if any(_is_symbolic(n) for shape in shapes for n in shape):
    raise UnsupportedError(f'{eqn.primitive.name} of constants with a dynamic shape')
  arrays = [np.broadcast_to(a, s) for a, s in zip(arrays, shapes)]
  with jax.default_device(jax.local_devices(backend='cpu')[0]):
    results = eqn.primitive.bind(*arrays, **eqn.params)
  results = results if eqn.primitive.multiple_results else [results]
  return [Const(np.asarray(r)) for r in results]


def _run(graph: _Graph, jaxpr, consts, inputs) -> list:
  """Maps the jaxpr's inputs to values, writes its equations, returns its outputs."""
  env = {}
  uses = {}
  for eqn in jaxpr.eqns:
    for var in eqn.invars:
      if not isinstance(var, jex_core.Literal):
        uses[var] = uses.get(var, 0) + 1
  for var in jaxpr.outvars:
    if not isinstance(var, jex_core.Literal):
      uses[var] = uses.get(var, 0) + 1
  boundary = set(jaxpr.invars) | set(jaxpr.constvars)  # values shared with the caller
  for var, value in zip(jaxpr.constvars, consts):
    env[var] = value if isinstance(value, (Const, Tensor, PendingConv, PendingReshape)) else Const(
        np.asarray(value))
  for var, value in zip(jaxpr.invars, inputs):
    env[var] = value

  def read(var):
    if isinstance(var, jex_core.Literal):
      return Const(np.asarray(var.val))
    return env[var]

  for eqn in jaxpr.eqns:
    values = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in _INLINED:
      inner = _inner_jaxpr(eqn)
      outputs = _run(graph, inner.jaxpr, inner.consts, values)
    elif name == 'dim_as_value':  # a (symbolic) size used as a number, e.g. by a mean
      outputs = [_dim_as_value(graph, eqn)]
    elif all(isinstance(v, Const) for v in values):
      outputs = _fold_constants(eqn, [v.array for v in values])
    elif name in _RULES:
      foldable = [not isinstance(v, jex_core.Literal) and v not in boundary and uses.get(v) == 1
                  for v in eqn.invars]
      outputs = _RULES[name](graph, eqn, values, foldable)
    else:
      raise UnsupportedError(f'no ONNX mapping for the JAX primitive {name!r}')
    for var, value in zip(eqn.outvars, outputs):
      env[var] = value
  return [read(v) for v in jaxpr.outvars]


def _dim_param(size, names: dict) -> str | int:
  if not _is_symbolic(size):
    return int(size)
  return names.get(str(size), str(size).replace(' ', ''))


def to_onnx(fn: Callable, spec: jax.ShapeDtypeStruct, *, input_name: str = 'images',
            output_name: str = 'logits', dim_names: Sequence[str] = (),
            metadata: dict[str, str] | None = None, opset: int = OPSET) -> onnx.ModelProto:
  """The ONNX model of `fn` (one array in, one array out).

  Args:
    fn: the function; its variables closed over (they become initializers).
    spec: the input's shape and dtype; symbolic dimensions
      (`jax.export.symbolic_shape`) become dynamic axes. Each must be
      `scale*var + offset` of its own variable.
    dim_names: names for the input's axes in the ONNX graph (default: the
      dimension expressions); output axes equal to an input axis share its name.
    metadata: written as the model's metadata_props.
  """
  closed = jax.make_jaxpr(fn)(spec)
  graph = _Graph()
  shape_name = graph.node('Shape', [input_name])
  names = {}
  for axis, size in enumerate(spec.shape):
    if not _is_symbolic(size):
      continue
    if axis < len(dim_names):
      names[str(size)] = dim_names[axis]
    variables = size._get_vars()  # pylint: disable=protected-access
    if len(variables) != 1:
      raise UnsupportedError(f'input dimension {size} must be scale*var + offset')
    (var,) = variables
    offset = int(size._evaluate({var: 0}))  # pylint: disable=protected-access
    scale = int(size._evaluate({var: 1})) - offset  # pylint: disable=protected-access
    dim = graph.node('Gather', [shape_name, graph.constant(np.array([axis], np.int64))], axis=0)
    if offset:
      dim = graph.node('Sub', [dim, graph.constant(np.array([offset], np.int64))])
    if scale != 1:
      dim = graph.node('Div', [dim, graph.constant(np.array([scale], np.int64))])
    graph.dim_env[var] = _Dim(graph, dim)

  (output,) = _run(graph, closed.jaxpr, closed.consts,
                   [Tensor(input_name, tuple(range(len(spec.shape))))])
  out_aval = closed.jaxpr.outvars[0].aval
  final = graph.tensor(output, tuple(range(len(out_aval.shape))))
  graph.nodes.append(helper.make_node('Identity', [final], [output_name]))

  def value_info(name, shape, dtype):
    return helper.make_tensor_value_info(
        name, _DTYPES[np.dtype(dtype)], [_dim_param(s, names) for s in shape])

  onnx_graph = helper.make_graph(
      graph.nodes, 'unet', [value_info(input_name, spec.shape, spec.dtype)],
      [value_info(output_name, out_aval.shape, out_aval.dtype)], graph.initializers)
  model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid('', opset)],
                            producer_name='unet_jax')
  model.ir_version = min(model.ir_version, 10)
  if metadata:
    helper.set_model_props(model, {k: str(v) for k, v in metadata.items()})
  return model

