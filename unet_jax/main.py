r"""Trains a U-Net: `python -m unet_jax.main --config=configs/carla.py --workdir=runs/carla`.

Any config field can be overridden (`--config.batch_size=8`). Started again on
the same workdir, training resumes from the latest checkpoint. This file only
parses flags; the work is in `unet_jax.train`. A known error (bad data,
config, workdir or checkpoint) prints as one line; `-v 1` adds the traceback.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from unet_jax import cli
from unet_jax import config_checks
from unet_jax import distributed
from unet_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for the config, checkpoints and logs.')
config_flags.DEFINE_config_file('config', None, 'Training config file (Python).',
                                lock_config=True)
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0 for multi-process runs (or JAX_COORDINATOR_ADDRESS).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (or JAX_NUM_PROCESSES).')
flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1 (or JAX_PROCESS_ID).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config_checks.check_fields(FLAGS.config)  # before anything starts, even the runtime
  distributed.initialize(FLAGS.config.distributed, FLAGS.coordinator_address,
                         FLAGS.num_processes, FLAGS.process_id)
  logging.info('JAX process %d of %d, local devices %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  logging.info('Config:\n%s', FLAGS.config)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  cli.run(main)
