"""The training benchmark (benchmarks/train_speed.py) on tiny configs: its
figures, its FLOP count against a hand count, and the training loop's own rate."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax import models
from unet_jax import sharding



def test_benchmark_runs_on_a_tiny_config_and_writes_json(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  from configs import carla  # pylint: disable=g-import-not-at-top
  from benchmarks import train_speed as benchmark  # pylint: disable=g-import-not-at-top

  config = carla.get_config('smoke')
  results = benchmark.run(config, steps=1, rounds=1, warmup=1, eval_steps=1, matmul_size=64)
  path = tmp_path / 'benchmark.json'
  benchmark.write_json(str(path), results)
  written = json.loads(path.read_text())
  for key in ('compile_seconds', 'train_step_seconds', 'train_images_per_second',
              'eval_images_per_second', 'achieved_gflops', 'percent_of_matmul_peak',
              'peak_host_memory_mb'):
    assert written[key] > 0, key
  assert written['matmul_peak_gflops']['float32'] > 0
  assert written['matmul_peak_gflops']['bfloat16'] > 0
  assert written['parameters'] == sum(
      int(np.prod(p.shape)) for p in jax.tree.leaves(
          jax.eval_shape(lambda: models.unet_from_config(config.model).init(
              jax.random.key(0), jnp.zeros((1, 32, 32, 3))))['params']))
  assert 'peer' not in written
  assert 'train images/s' in benchmark.format_table(results)


def _forward_convolution_flops(config) -> float:
  """2 * multiply-adds of every convolution of the U-Net (SAME padding), by hand."""
  height, width = config.data.image_size
  base, depth, classes = (config.model.base_filters, config.model.depth,
                          config.model.num_classes)
  total, channels = 0, 3
  for level in range(depth + 1):  # contracting blocks, then the bottleneck
    pixels, features = height * width // 4**level, base * 2**level
    total += 9 * pixels * (channels * features + features * features)
    channels = features
  for level in reversed(range(depth)):
    pixels, features = height * width // 4**level, base * 2**level
    total += (pixels // 4) * 4 * (2 * features) * features  # 2x2 up-convolution
    total += 9 * pixels * (2 * features * features + features * features)
  total += height * width * base * classes
  return 2.0 * config.batch_size * total


def test_benchmark_counts_the_flops_of_the_convolutions():
  # The count comes from the traced step, which no backend has rewritten
  # (a GPU's compiled step hides its convolutions in library calls). A train
  # step is three forward passes (forward, input and kernel gradients) less
  # the input gradient of the first convolution, which nothing needs.
  from configs import carla  # pylint: disable=g-import-not-at-top
  from benchmarks import train_speed as benchmark  # pylint: disable=g-import-not-at-top

  config = carla.get_config('smoke')
  config.model.use_batch_norm = False
  config.model.dropout_rate = 0.0
  config.data.image_size = (32, 64)
  step = benchmark.JaxTrainStep(config, sharding.create_mesh(),
                                benchmark.random_batches(config, 1))
  forward = _forward_convolution_flops(config)
  first_convolution = 2.0 * config.batch_size * 32 * 64 * 9 * 3 * config.model.base_filters
  np.testing.assert_allclose(step.flops, 3 * forward - first_convolution, rtol=1e-9)
  assert 0.8 < step.xla_flops / step.flops < 1.5  # XLA's count adds element-wise work


def test_the_package_works_without_torch():
  # PyTorch is the optional extra of the benchmark's --peer=torch path only
  # (`sys.modules['torch'] = None` makes every `import torch` fail).
  code = ('import sys\n'
          'sys.modules["torch"] = None\n'
          'from unet_jax import input_pipeline, models, train\n'
          'from benchmarks import train_speed\n')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=pathlib.Path(__file__).parents[1])


def test_benchmark_times_the_training_loop_by_its_own_figures(synthetic_dir):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from benchmarks import train_speed as benchmark  # pylint: disable=g-import-not-at-top

  config = tiny_config(synthetic_dir)
  results = benchmark.run(config, steps=1, rounds=1, warmup=1, eval_steps=1, matmul_size=64,
                          loop_steps=6)
  loop = results['loop']
  assert loop['loop_images_per_second'] > 0 and loop['pure_step_images_per_second'] > 0
  assert loop['overhead_percent'] == pytest.approx(
      100 * (1 - loop['loop_images_per_second'] / loop['pure_step_images_per_second']))
  assert 'training loop images/s' in benchmark.format_table(results)
