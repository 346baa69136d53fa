r"""The U-Net paper's setting (Ronneberger et al., 2015): 64 base filters,
unpadded (VALID) convolutions, 572x572 input tiles giving 388x388 logits.

    python -m unet_jax.main --config=configs/unet_paper.py --workdir=runs/paper \
        --config.data.data_dir=/path/to/carla

The labels are centre-cropped to the 388x388 output. A speed setting, not a
quality recipe (no quality figure is claimed for it): 31,033,175 parameters
and about 0.9 TFLOP per trained 572x572 tile; on one H200 in bfloat16 the
train step runs at about 400 tiles/s (README, Speed), so 40 epochs of the
490 frames take under a minute. On 2 CPU cores, hours.
"""

from configs import carla


def get_config(arg: str | None = None):
  config = carla.get_config()
  config.model.base_filters = 64
  config.model.padding = 'VALID'
  config.model.use_batch_norm = False  # the paper has none
  config.model.dropout_rate = 0.0
  config.model.dropout_blocks = 0
  config.data.image_size = (572, 572)
  config.batch_size = 8
  config.learning_rate = 1e-4
  config.model.dtype = 'bfloat16'
  # Unpadded convolutions predict a smaller centre: no whole-frame scoring at
  # another size and no test-time scales (predict --mode=tile covers frames).
  config.inference.eval_size = ()
  config.inference.tta_flip = False
  config.inference.tta_scales = (1.0,)
  if arg == 'smoke':
    config.data.image_size = (188, 188)
    config.model.base_filters = 4
    config.batch_size = 2
    config.num_epochs = 1
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; known: smoke')
  return config
