"""U-Net semantic segmentation of road scenes in JAX/Flax."""

from unet_jax import xla_flags as _xla_flags

# Before anything creates a JAX backend: XLA reads XLA_FLAGS only then.
_xla_flags.set_default_flags()
