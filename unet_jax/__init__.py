"""U-Net semantic segmentation of road scenes in JAX/Flax.

Importing the package changes nothing global: each entry point's `main`
applies the default XLA flags (`unet_jax.xla_flags`) before JAX starts.
"""
