r"""Images per second delivered by `train_batches`, against the train step's rate.

    python -m benchmarks.input_pipeline_speed [--data_dir=data/synthetic_benchmark] \
        [--num_scenes=500] [--epochs=2] [--train_steps=5]

The CARLA setting (configs/carla.py: 96x128, batch 32) on synthetic 640x480
scenes, written first if the folder is empty. Both delivery modes are timed,
with the config's augmentation (off) and with every augmentation on. Each
batch is waited for (`block_until_ready`), so the figure is what a training
loop could consume. If unet_jax.train is importable its train step is timed
on the same batches for comparison.
"""

import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, '.')  # configs/ is not a package of the install
from configs import carla  # noqa: E402
from unet_jax import input_pipeline  # noqa: E402
from unet_jax import models  # noqa: E402
from unet_jax import xla_flags  # noqa: E402

_DATA_DIR = flags.DEFINE_string('data_dir', 'data/synthetic_benchmark', 'CARLA-format folder.')
_NUM_SCENES = flags.DEFINE_integer('num_scenes', 500, 'Synthetic scenes to write if it is empty.')
_EPOCHS = flags.DEFINE_integer('epochs', 2, 'Epochs timed per mode, after one warm-up batch.')
_TRAIN_STEPS = flags.DEFINE_integer('train_steps', 5, 'Train steps timed, after compilation.')


def _config(device_cache: str, augment: bool):
  config = carla.get_config()
  config.data.data_dir = _DATA_DIR.value
  config.data.synthetic_scenes = _NUM_SCENES.value
  config.data.device_cache = device_cache
  if augment:
    config.data.augment.horizontal_flip = True
    config.data.augment.scale_range = (1.0, 1.5)
    config.data.augment.brightness = 0.2
    config.data.augment.contrast = 0.2
    config.data.augment.saturation = 0.2
  return config


def images_per_second(train: input_pipeline.SegmentationData, epochs: int) -> float:
  jax.block_until_ready(next(train.train_batches(epoch=0)))  # compile / start threads
  start = time.perf_counter()
  images = 0
  for epoch in range(1, epochs + 1):
    for batch in train.train_batches(epoch):
      jax.block_until_ready(batch)
      images += batch['image'].shape[0]
  return images / (time.perf_counter() - start)


def train_step_images_per_second(config, mesh, train: input_pipeline.SegmentationData,
                                 steps: int) -> float | None:
  try:
    from unet_jax import train as train_lib  # pylint: disable=g-import-not-at-top
    lr = train_lib.create_learning_rate_fn(config, train.steps_per_epoch)
    state = train_lib.create_replicated_train_state(
        config, models.unet_from_config(config.model), lr, jax.random.key(0), mesh)
    step = train_lib.compile_train_step(config, mesh, lr, None)
  except (ImportError, AttributeError, TypeError) as e:
    print(f'train step not timed ({type(e).__name__}: {e})')
    return None
  key = jax.device_put(jax.random.key(1), train_lib.replicated(mesh))
  batches = list(train.train_batches(epoch=0))[:steps + 1]
  state, metrics = step(state, batches[0], key)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for batch in batches[1:]:
    state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  return (len(batches) - 1) * train.global_batch_size / (time.perf_counter() - start)


def main(argv):
  xla_flags.set_default_flags()  # before JAX starts: XLA reads XLA_FLAGS once
  del argv
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))  # as unet_jax.train builds it
  rates = {}
  for mode in ('always', 'never'):
    for augment in (False, True):
      config = _config(mode, augment)
      train = input_pipeline.create_datasets(config, mesh)['train']
      name = f"{'device cache' if mode == 'always' else 'streaming'}, augmentation {'on' if augment else 'off'}"
      rates[name] = images_per_second(train, _EPOCHS.value)
      print(f'{name:40s} {rates[name]:9.1f} images/s  ({train.num_examples} training examples)')
  step_rate = train_step_images_per_second(_config('always', False), mesh, train,
                                           _TRAIN_STEPS.value)
  if step_rate:
    print(f"{'train step (configs/carla.py)':40s} {step_rate:9.1f} images/s")
    for name, rate in rates.items():
      print(f'{name:40s} {rate / step_rate:9.1f}x the train step')


if __name__ == '__main__':
  app.run(main)
