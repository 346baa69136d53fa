"""The jaxpr -> ONNX writer on layers the U-Net configs do not use yet."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

onnx = pytest.importorskip('onnx')
onnxruntime = pytest.importorskip('onnxruntime')

from unet_jax import onnx_graph  # pylint: disable=g-import-not-at-top,wrong-import-position


class MobileBlock(nn.Module):
  """Depthwise stride-2 conv with TF-style asymmetric padding, batch norm,
  ReLU6 and clip, a pointwise conv, a mean and a flatten."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), padding='SAME', use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    x = jax.nn.relu6(x)
    x = nn.Conv(8, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), feature_group_count=8,
                use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    x = jnp.clip(x, 0.0, 6.0)
    x = nn.Conv(5, (1, 1))(x)
    pooled = x.mean(axis=(1, 2), keepdims=True)
    return jnp.concatenate([x - pooled, jnp.tanh(x)], axis=-1)


def test_depthwise_asymmetric_padding_relu6_and_dynamic_axes_match_jax():
  model = MobileBlock()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda a: np.asarray(a) + rng.uniform(0.1, 1, a.shape).astype(
      np.float32), variables)
  function = lambda x: model.apply(variables, x)
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape('b, 2*h, 2*w, 3'), jnp.float32)
  proto = onnx_graph.to_onnx(function, spec, dim_names=('batch', 'height', 'width'))
  onnx.checker.check_model(proto, full_check=True)
  ops = [n.op_type for n in proto.graph.node]
  groups = [a.i for n in proto.graph.node if n.op_type == 'Conv' for a in n.attribute
            if a.name == 'group']
  assert 8 in groups and 'BatchNormalization' not in ops
  session = onnxruntime.InferenceSession(proto.SerializeToString(),
                                         providers=['CPUExecutionProvider'])
  for shape in ((1, 16, 16, 3), (2, 10, 14, 3)):
    images = rng.uniform(0, 1, shape).astype(np.float32)
    want = np.asarray(jax.jit(function)(images))
    got = session.run(None, {'images': images})[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_an_unknown_primitive_is_refused_by_name():
  spec = jax.ShapeDtypeStruct((2, 3), jnp.float32)
  with pytest.raises(onnx_graph.UnsupportedError, match='cumsum'):
    onnx_graph.to_onnx(lambda x: jnp.cumsum(x, axis=1), spec)
