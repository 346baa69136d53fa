"""The fast formulations compute the same function as the straightforward ones.

Forward values and gradients on random inputs, against `nn.max_pool`,
`nn.ConvTranspose` and a U-Net built from them; and the default XLA flags
against XLA's own defaults.
"""


import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import models
from unet_jax import xla_flags


def _flax_max_pool(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2))


def test_max_pool_2x2_equals_flax_max_pool_forward_and_gradient():
  x = jax.random.normal(jax.random.key(0), (2, 6, 8, 5))
  cotangent = jax.random.normal(jax.random.key(1), (2, 3, 4, 5))
  ours, ours_vjp = jax.vjp(models.max_pool_2x2, x)
  reference, reference_vjp = jax.vjp(_flax_max_pool, x)
  np.testing.assert_array_equal(ours, reference)
  np.testing.assert_allclose(ours_vjp(cotangent)[0], reference_vjp(cotangent)[0], rtol=1e-6)


def test_upconv_gradients_equal_flax_conv_transpose():
  x = jax.random.normal(jax.random.key(1), (2, 5, 7, 6))
  reference = nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding='VALID')
  params = reference.init(jax.random.key(2), x)
  cotangent = jax.random.normal(jax.random.key(3), (2, 10, 14, 4))

  def pullback(apply_fn):
    _, vjp = jax.vjp(apply_fn, params, x)
    return vjp(cotangent)

  ours = pullback(models.UpConv2x2(4).apply)
  theirs = pullback(reference.apply)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


class _FlaxUNet(nn.Module):
  """The U-Net written with flax's own layers, as the reference."""
  num_classes: int
  base_filters: int
  depth: int

  @nn.compact
  def __call__(self, x):
    def block(x, features, name):
      for i in range(2):
        x = nn.relu(nn.Conv(features, (3, 3), padding='SAME', name=f'{name}_conv{i}')(x))
      return x
    skips = []
    for level in range(self.depth):
      x = block(x, self.base_filters * 2**level, f'down{level}')
      skips.append(x)
      x = _flax_max_pool(x)
    x = block(x, self.base_filters * 2**self.depth, 'bottleneck')
    for level in reversed(range(self.depth)):
      features = self.base_filters * 2**level
      x = nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding='VALID',
                           name=f'upconv{level}')(x)
      x = block(jnp.concatenate([x, skips[level]], -1), features, f'up{level}')
    return nn.Conv(self.num_classes, (1, 1), name='classifier')(x)


def _to_reference_params(params):
  """unet_jax's parameter tree in the reference's flat naming."""
  flat = {}
  for name, module in params.items():
    if 'conv0' in module:  # a ConvBlock
      for conv in ('conv0', 'conv1'):
        flat[f'{name}_{conv}'] = module[conv]
    else:
      flat[name] = module
  return flat


def test_unet_forward_and_gradients_equal_the_flax_layer_reference():
  # ReLU zeros give tied maxima in the pooling windows: the gradients must
  # still agree (tied entries have zero gradient through the ReLU).
  x = jax.random.normal(jax.random.key(0), (2, 16, 24, 3))
  labels = jax.random.randint(jax.random.key(1), (2, 16, 24), 0, 5)
  ours = models.UNet(num_classes=5, base_filters=4, depth=2)
  reference = _FlaxUNet(num_classes=5, base_filters=4, depth=2)
  params = ours.init(jax.random.key(2), x)['params']

  def loss(apply_fn, params):
    logits = apply_fn({'params': params}, x)
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[..., None], -1)), logits

  (ours_loss, ours_logits), ours_grads = jax.value_and_grad(
      lambda p: loss(ours.apply, p), has_aux=True)(params)
  (ref_loss, ref_logits), ref_grads = jax.value_and_grad(
      lambda p: loss(reference.apply, p), has_aux=True)(_to_reference_params(params))
  np.testing.assert_allclose(ours_logits, ref_logits, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ours_loss, ref_loss, rtol=1e-5)
  ours_flat = _to_reference_params(ours_grads)
  assert jax.tree.structure(ours_flat) == jax.tree.structure(ref_grads)
  for a, b in zip(jax.tree.leaves(ours_flat), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------
# Default XLA flags.


def test_default_flags_are_appended_and_never_override_the_user():
  added = xla_flags.CPU_FLAGS[0]
  assert xla_flags.with_default_flags('', '0.10.2') == added
  assert xla_flags.with_default_flags('--xla_dump_to=/tmp/d', '0.10.2') == (
      f'--xla_dump_to=/tmp/d {added}')
  mine = '--xla_cpu_experimental_ynn_fusion_type=individual_dot'
  assert xla_flags.with_default_flags(mine, '0.10.2') == mine
  assert xla_flags.with_default_flags('--a=1', '0.9.0') == '--a=1'  # untested jaxlib
  assert xla_flags.with_default_flags('', '0.10.2', platforms='cuda') == ''
  assert xla_flags.with_default_flags('', '0.10.2', platforms='cuda,cpu') == added
  for version in ('0.11.2', '0.12.0.1'):  # the GPU image's and the pinned set-up's
    assert xla_flags.with_default_flags('', version) == added


def test_importing_the_package_sets_no_xla_flags():
  # (Libraries it imports set variables of their own, such as TF_CPP_MIN_LOG_LEVEL.)
  code = ('import os, sys\n'
          'import unet_jax.train, unet_jax.evaluate, unet_jax.predict, unet_jax.main\n'
          'sys.exit("XLA_FLAGS" in os.environ)\n')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  subprocess.run([sys.executable, '-c', code], check=True, env=env,
                 cwd=pathlib.Path(__file__).parents[1])


def test_default_flags_give_the_same_train_gradients_as_xla_defaults():
  from jaxlib import version  # pylint: disable=g-import-not-at-top
  if not version.__version__.startswith(xla_flags.TESTED_JAXLIB) or jax.default_backend() != 'cpu':
    pytest.skip('the flags are set for the tested CPU jaxlib only')
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  labels = jax.random.randint(jax.random.key(1), (2, 16, 16), 0, 3)
  model = models.UNet(num_classes=3, base_filters=8, depth=2)
  params = model.init(jax.random.key(2), x)['params']

  def loss(params):
    logits = model.apply({'params': params}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))

  lowered = jax.jit(jax.value_and_grad(loss)).lower(params)
  # XLA's defaults route convolutions through YNNPACK; ours keep them on XLA's own.
  xla_default = {'xla_cpu_experimental_ynn_fusion_type':
                 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'}
  ours = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}
  assert 'ynn_fusion_type=-individual_convolution' in xla_flags.CPU_FLAGS[0]
  default_text = lowered.compile(compiler_options=xla_default).as_text()
  ours_compiled = lowered.compile(compiler_options=ours)
  assert '__ynn_fusion' in default_text and 'convolution(' in ours_compiled.as_text()
  default_loss, default_grads = lowered.compile(compiler_options=xla_default)(params)
  ours_loss, ours_grads = ours_compiled(params)
  np.testing.assert_allclose(ours_loss, default_loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(default_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
