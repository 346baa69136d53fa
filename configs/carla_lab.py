r"""The original CARLA U-Net recipe, faithfully: the baseline to beat.

    python -m unet_jax.main --config=configs/carla_lab.py --workdir=runs/carla_lab \
        --config.data.data_dir=/path/to/carla

The network of the study this project grew from: 3x3 stride-2 transposed
convolutions as up-convolutions and one more 3x3 convolution of 32 filters
before the 1x1 classifier (8,640,471 parameters); 96x128 inputs, dropout 0.3
in the two deepest blocks, Adam 1e-3, batch 32, sparse cross-entropy, no
augmentation, 40 epochs.

Expected (docs/quality.md, Earlier results on real CARLA frames): on one H200 (jax 0.11.2),
about 40 s a run; validation mean IoU 0.185 +- 0.016 over 3 seeds (pixel
accuracy 0.870) on the earlier 258-frame split scored at 96x128; on recordings
outside ../shared, 0.193 +- 0.015 at 640x480. On the current split, scored
on whole 480x640 validation frames, 3 seeds: mean IoU 0.197 +- 0.003,
pixel accuracy 0.890 +- 0.003 (100 to 125 minutes a run on one core of a
2-core AMD EPYC CPU, jax 0.12: its transposed convolutions are slow there).
"""

from configs import carla


def get_config(arg: str | None = None):
  config = carla.get_config(arg)
  config.model.upconv_kernel_size = 3
  config.model.head_filters = 32
  config.model.dropout_rate = 0.3
  config.model.dropout_blocks = 2
  config.model.use_batch_norm = False
  config.optimizer = 'adam'
  config.learning_rate = 1e-3
  config.lr_schedule = 'constant'
  config.warmup_epochs = 0.0
  config.class_weighting = 'none'
  config.data.augment.horizontal_flip = False
  config.data.augment.scale_range = (1.0, 1.0)
  config.data.augment.brightness = 0.0
  config.data.augment.contrast = 0.0
  config.data.augment.saturation = 0.0
  config.inference.tta_flip = False  # the study predicted with the model alone
  config.inference.tta_scales = (1.0,)
  if not arg:
    config.data.image_size = (96, 128)
    config.batch_size = 32
    config.num_epochs = 40
  return config
