"""The mesh and the two shardings every program uses.

One mesh axis, 'data': batches are split along it and everything else
(parameters, optimizer state, batch-norm statistics) is replicated.
"""

import jax
import numpy as np


def create_mesh(devices=None) -> jax.sharding.Mesh:
  """A one-axis mesh over `devices`, by default every device of every process."""
  return jax.sharding.Mesh(np.array(jax.devices() if devices is None else devices), ('data',))


def local_mesh() -> jax.sharding.Mesh:
  """A mesh over this process's devices alone, for work that needs no other host."""
  return create_mesh(jax.local_devices())


def replicated(mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def data_sharded(mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
