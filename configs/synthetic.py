r"""The demo: a small CARLA-setting U-Net on generated synthetic road scenes.

    python -m unet_jax.main --config=configs/synthetic.py --workdir=runs/synthetic

Writes 480 scenes to data/synthetic on first use (the CARLA on-disk format),
then trains at 64x96 for 6 epochs. Expected on a 2-core CPU (`make demo`):
about 70 seconds with scene generation, evaluation, prediction and export;
validation pixel accuracy about 0.81 and mean IoU about 0.19 (0.808 / 0.188
measured with seed 0 on jax 0.12.0.1; 0.771 / 0.206 on 4 unseen scenes).
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
  # 96 steps are too few for batch norm's running statistics (and for a
  # warm-up, a decay and class weights to pay): plain Adam, as in the lab.
  config.model.use_batch_norm = False
  config.lr_schedule = 'constant'
  config.warmup_epochs = 0.0
  config.class_weighting = 'none'
  config.data.augment.update(horizontal_flip=False, scale_range=(1.0, 1.0), brightness=0.0,
                             contrast=0.0, saturation=0.0)
  # evaluate and predict: the model alone, at its own size.
  config.inference.update(eval_size=(), tta_flip=False, tta_scales=(1.0,))
  return config
