"""Multi-process start-up through JAX's own runtime (`jax.distributed`), and
the waits between processes that must not fail when one is late.

Every process runs the same command. The coordinator address, the number of
processes and this process's id come from the arguments, or from the
environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`),
or, on SLURM and Cloud TPU, from JAX's own cluster detection.

It must run before anything touches a JAX device: the runtime has to know the
other processes before the backends start.
"""

from collections.abc import Callable, Mapping
import itertools
import os
from typing import TypeVar

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from unet_jax import errors
from unet_jax import sharding

MODES = ('auto', 'on', 'off')
# How long the other processes wait for process 0 to prepare a dataset.
PREPARATION_TIMEOUT_S = 6 * 3600
_DONE = 'done'
_outcome_numbers = itertools.count()
T = TypeVar('T')
# What JAX's SLURM detection reads (jax._src.clusters.slurm_cluster).
_SLURM_STEP_VARIABLES = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
                         'SLURM_LOCALID')


def in_slurm_job_step(environ: Mapping[str, str]) -> bool:
  """A job step of several tasks started by srun (a batch script itself is one task)."""
  return (all(name in environ for name in _SLURM_STEP_VARIABLES)
          and int(environ['SLURM_NTASKS']) > 1)


def cluster_requested(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether the environment names a multi-process job.

  A Cloud TPU VM describes its slice through the metadata server rather than
  the environment; there `config.distributed='on'` asks JAX to look.
  """
  if environ.get('JAX_COORDINATOR_ADDRESS'):
    return True
  if in_slurm_job_step(environ):
    return True
  tpu_hosts = environ.get('TPU_PROCESS_ADDRESSES') or environ.get('TPU_WORKER_HOSTNAMES') or ''
  return ',' in tpu_hosts or bool(environ.get('MEGASCALE_COORDINATOR_ADDRESS'))


def slurm_local_device_ids(environ: Mapping[str, str] = os.environ) -> list[int] | None:
  """Every GPU of the node when srun starts one task per node; otherwise None.

  JAX's SLURM detection gives task i of a node only GPU i, which suits one
  task per GPU but would leave all GPUs but the first idle with one task per
  node. `JAX_LOCAL_DEVICE_IDS`, when set, decides instead.
  """
  if not in_slurm_job_step(environ) or environ.get('JAX_LOCAL_DEVICE_IDS'):
    return None
  gpus = int(environ.get('SLURM_GPUS_ON_NODE') or 0)
  nodes = int(environ.get('SLURM_STEP_NUM_NODES') or 0)
  if gpus > 1 and nodes == int(environ['SLURM_NTASKS']):
    return list(range(gpus))
  return None


def initialize(mode: str = 'auto', coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Starts the multi-process runtime; returns whether it was started.

  mode: 'off' never, 'on' always (arguments, environment or JAX's cluster
  detection must then say how), 'auto' when the arguments or the environment
  ask for it.
  """
  if mode not in MODES:
    raise ValueError(f'distributed must be one of {MODES}, got {mode!r}')
  if mode == 'off' or (mode == 'auto' and coordinator_address is None
                       and not cluster_requested()):
    return False
  if num_processes is None and os.environ.get('JAX_NUM_PROCESSES'):
    num_processes = int(os.environ['JAX_NUM_PROCESSES'])
  if process_id is None and os.environ.get('JAX_PROCESS_ID'):
    process_id = int(os.environ['JAX_PROCESS_ID'])
  # Collectives between processes on CPU devices (tests, CPU clusters) need an
  # implementation; gloo ships with jaxlib. GPU and TPU devices ignore it.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=slurm_local_device_ids())
  logging.info('jax.distributed: process %d of %d', jax.process_index(), jax.process_count())
  connect_collectives()
  return True


def connect_collectives() -> None:
  """Opens, while every process is here, the device groups training communicates over.

  On CPU devices (gloo) a group's connection is made the first time a
  computation uses it, and gives up after 30 s when the processes arrive
  further apart than that: one still compiling its train step, or preparing
  the data while the others wait. Once made, a group waits as long as it
  must. `jax.distributed.initialize` has just held every process until all
  had arrived, so they are together now. The groups: every device (the
  train and evaluation steps' sums) and one device per process (the
  barriers and gathers of `multihost_utils`, which Orbax uses too).
  """
  if jax.process_count() == 1:
    return
  mesh = sharding.create_mesh()
  ones = jax.make_array_from_callback((jax.device_count(),), sharding.data_sharded(mesh),
                                      lambda index: np.ones((1,), np.int32))
  total = jax.jit(lambda x: x.sum(), out_shardings=sharding.replicated(mesh))
  count = int(np.asarray(total(ones).addressable_data(0)))
  if count != jax.device_count():
    raise RuntimeError(f'a sum over the {jax.device_count()} devices gave {count}')
  multihost_utils.sync_global_devices('unet_jax.distributed: every process connected')


def process_0_first(work: Callable[[], T], name: str,
                    timeout_s: float = PREPARATION_TIMEOUT_S) -> T:
  """Runs `work` on process 0, then, once it has succeeded there, on the others.

  Shared folders are then written once (the others find the result); on
  host-local disks every process does the same deterministic work itself.
  The others wait for process 0's outcome in the runtime's key-value store,
  not on the devices: a wait of any length meets none of the device groups'
  time limits. When `work` fails on process 0 the others stop too, with one
  line that gives process 0's error. Every process must call this the same
  number of times in the same order.
  """
  if jax.process_count() == 1:
    return work()
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  client = ocp.multihost.get_jax_distributed_client()
  key = f'unet_jax/process_0_first/{name.replace(" ", "_")}/{next(_outcome_numbers)}'
  if jax.process_index() == 0:
    try:
      result = work()
    except Exception as error:
      lines = str(error).strip().splitlines()
      client.key_value_set(key, lines[0] if lines else type(error).__name__)
      raise
    client.key_value_set(key, _DONE)
    return result
  outcome = str(client.blocking_key_value_get(key, int(timeout_s * 1000)))
  if outcome != _DONE:
    raise errors.UserError(f'process 0 failed at {name}: {outcome}')
  return work()
