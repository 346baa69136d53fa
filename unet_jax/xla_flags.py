"""The XLA CPU options unet_jax runs with by default, set before JAX starts.

XLA reads `XLA_FLAGS` once, when JAX creates its first backend, so each
entry point's `main` appends these to the environment variable first (a
library module changes no global state at import; a program that calls
unet_jax's functions itself can call `set_default_flags()` before JAX starts).
A flag the user already set in `XLA_FLAGS` is left as the user set it.

`--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` leaves
convolutions to XLA's own (Eigen) convolution instead of the YNNPACK library
path that jaxlib 0.10 to 0.12 take by default. Matrix products stay on
YNNPACK. Measured on a 2-core AMD EPYC CPU, CARLA setting (batch 32, 96x128),
in one process: the whole train step 1.39x faster with jaxlib 0.10.2 (3.4 s
against 4.7 s); with jaxlib 0.12.0.1 on a 2-core Xeon, 0.68x PyTorch's speed
with the flag against 0.46x without. YNNPACK is slowest on the kernel
gradients of the high-resolution, few-channel layers.
Results agree within float32 rounding (tests/speed_formulation_test.py).
"""

import os

# jaxlib versions whose XLA knows these flags (an unknown flag in XLA_FLAGS
# aborts the process, so other versions get none).
TESTED_JAXLIB = ('0.10.', '0.11.', '0.12.')

CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',)


def _flag_name(flag: str) -> str:
  return flag.split('=', 1)[0]


def with_default_flags(xla_flags: str, jaxlib_version: str, platforms: str = '') -> str:
  """`xla_flags` with the defaults appended (those the user did not set).

  Nothing is added for an untested jaxlib, or where `platforms` (the value
  of JAX_PLATFORMS) names platforms without 'cpu'.
  """
  if not jaxlib_version.startswith(TESTED_JAXLIB):
    return xla_flags
  if platforms and 'cpu' not in platforms.lower().split(','):
    return xla_flags
  user_names = {_flag_name(flag) for flag in xla_flags.split()}
  added = [flag for flag in CPU_FLAGS if _flag_name(flag) not in user_names]
  return ' '.join([xla_flags.strip(), *added]).strip()


def set_default_flags() -> None:
  """Appends the defaults to os.environ['XLA_FLAGS'] (before JAX starts)."""
  from jaxlib import version  # pylint: disable=g-import-not-at-top  (does not start JAX)
  os.environ['XLA_FLAGS'] = with_default_flags(os.environ.get('XLA_FLAGS', ''),
                                               version.__version__,
                                               os.environ.get('JAX_PLATFORMS', ''))
