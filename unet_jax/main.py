r"""Trains a U-Net: `python -m unet_jax.main --config=configs/carla.py --workdir=runs/carla`.

Any config field can be overridden (`--config.batch_size=8`). Started again on
the same workdir, training resumes from the latest checkpoint. This file only
parses flags; the work is in `unet_jax.train`. A known error (bad data,
config, workdir or checkpoint) prints as one line; `--verbose` adds the
traceback and every library's log lines.
"""

import os
import pathlib
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from unet_jax import checkpointing
from unet_jax import cli
from unet_jax import config_checks
from unet_jax import console
from unet_jax import distributed
from unet_jax import models
from unet_jax import train
from unet_jax import xla_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined only when it runs, so importing never clashes."""
  flags.DEFINE_string('workdir', None, 'Directory for the config, checkpoints and logs.')
  config_flags.DEFINE_config_file('config', None, 'Training config file (Python).',
                                  lock_config=True)
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 for multi-process '
                      'runs (or JAX_COORDINATOR_ADDRESS).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (or JAX_NUM_PROCESSES).')
  flags.DEFINE_integer('process_id', None,
                       'This process, 0..num_processes-1 (or JAX_PROCESS_ID).')
  flags.mark_flags_as_required(['config', 'workdir'])


LOG_FILE = 'train.log'


def config_summary(config) -> str:
  """The run in one line; the whole config goes to the log file and config.json."""
  model = config.model
  height, width = config.data.image_size
  if model.encoder != 'unet':
    variant = models.encoder_variant(model).capitalize()
    network = (f'EfficientNet-{variant} U-Net ({"ImageNet" if model.pretrained else "random"} '
               f'encoder, decoder {"/".join(map(str, model.decoder_filters))}, {model.dtype})')
  else:
    network = (f'U-Net (base {model.base_filters}, depth {model.depth}, {model.padding}'
               f'{", batch norm" if model.use_batch_norm else ""}, {model.dtype})')
  crop = config.data.train_crop_size
  return (f'{network} at {height}x{width}'
          f'{f" (training crops {crop[0]}x{crop[1]})" if crop else ""} on '
          f'{config.data.data_dir}; batch {config.batch_size}, {config.num_epochs} epochs, '
          f'{config.optimizer} {config.learning_rate:g} {config.lr_schedule}, class weights '
          f'{config.class_weighting}'
          f'{f"; starting from the model of {config.init_from}" if config.init_from else ""}')


def main(argv):
  xla_flags.set_default_flags()  # before JAX starts: XLA reads XLA_FLAGS once
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config_checks.check_fields(FLAGS.config)  # before anything starts, even the runtime
  console.setup(verbose=cli.verbose())
  distributed.initialize(FLAGS.config.distributed, FLAGS.coordinator_address,
                         FLAGS.num_processes, FLAGS.process_id)
  # Fields that contradict each other, or the devices, before the workdir is touched.
  config_checks.check_config(FLAGS.config, num_devices=jax.device_count())
  log_file = pathlib.Path(FLAGS.workdir) / (
      LOG_FILE if jax.process_index() == 0 else f'train.{jax.process_index()}.log')
  checkpointing.check_workdir(FLAGS.workdir)  # (a clear error if it cannot take the log)
  console.add_log_file(log_file)
  logging.info('JAX process %d of %d, local devices %s, XLA_FLAGS=%r', jax.process_index(),
               jax.process_count(), jax.local_devices(), os.environ.get('XLA_FLAGS', ''),
               extra=console.FILE_ONLY)
  logging.info('Config:\n%s', FLAGS.config, extra=console.FILE_ONLY)
  logging.info('%s', config_summary(FLAGS.config))
  logging.info('Workdir %s (log: %s)', FLAGS.workdir, log_file)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def add_config_root(argv: list[str]) -> None:
  """Lets a config file import its siblings (`from configs import carla`).

  The config is loaded as a file while the flags are parsed, so its imports
  resolve on `sys.path`, which holds the current directory under `python -m`
  and not even that under the `unet-jax-train` script: the folder that holds
  the config's folder goes first there, wherever the command runs from.
  """
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      value = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    path = pathlib.Path(value.split(':', 1)[0])  # 'file.py:arg' passes `arg` to get_config
    root = str(path.resolve().parent.parent)
    if root not in sys.path:
      sys.path.insert(0, root)
    return


def run() -> None:
  """The console script `unet-jax-train`."""
  add_config_root(sys.argv)
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
