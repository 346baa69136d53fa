r"""The demo: a small CARLA-setting U-Net on generated synthetic road scenes.

    python -m unet_jax.main --config=configs/synthetic.py --workdir=runs/synthetic

Writes 480 scenes to data/synthetic on first use (the CARLA on-disk format),
then trains at 64x96 for a few minutes on 2 CPU cores.
"""

from configs import carla


def get_config(arg: str | None = None):
  config = carla.get_config(arg)  # 'smoke': carla's tiny model and images
  if arg == 'smoke':
    config.data.data_dir = 'data/synthetic_smoke'
    config.data.synthetic_scenes = 24
    return config
  config.data.data_dir = 'data/synthetic'
  config.data.synthetic_scenes = 480
  config.data.image_size = (64, 96)
  config.model.base_filters = 16
  config.batch_size = 16
  config.num_epochs = 6
  config.checkpoint_every_steps = 50
  return config
