"""Multi-process start-up through JAX's own runtime (`jax.distributed`).

Every process runs the same command. The coordinator address, the number of
processes and this process's id come from the arguments, or from the
environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`),
or, on SLURM and Cloud TPU pods, from JAX's own cluster detection.
"""

import os

from absl import logging
import jax


def cluster_requested() -> bool:
  """Whether the environment names a multi-process job."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in os.environ:
    return True
  return ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '') or ',' in os.environ.get(
      'TPU_PROCESS_ADDRESSES', '')


def initialize(mode: str = 'auto', coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Starts the multi-process runtime; returns whether it was started.

  mode: 'off' never, 'on' always (arguments, environment or cluster detection
  must then say how), 'auto' when arguments or the environment ask for it.
  """
  if mode not in ('auto', 'on', 'off'):
    raise ValueError(f"distributed must be 'auto', 'on' or 'off', got {mode!r}")
  explicit = coordinator_address is not None
  if mode == 'off' or (mode == 'auto' and not explicit and not cluster_requested()):
    return False
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if num_processes is None and 'JAX_NUM_PROCESSES' in os.environ:
    num_processes = int(os.environ['JAX_NUM_PROCESSES'])
  if process_id is None and 'JAX_PROCESS_ID' in os.environ:
    process_id = int(os.environ['JAX_PROCESS_ID'])
  if jax.config.jax_platforms in (None, '', 'cpu') or os.environ.get('JAX_PLATFORMS') == 'cpu':
    # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info('jax.distributed: process %d of %d', jax.process_index(), jax.process_count())
  return True
