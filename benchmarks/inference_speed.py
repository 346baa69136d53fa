r"""Inference speed of one U-Net in JAX, ONNX Runtime and PyTorch, in one process.

    PYTHONPATH=. python benchmarks/inference_speed.py --config=configs/carla.py \
        [--workdir=runs/carla] [--sizes=96x128,480x640] [--json=inference.json]

The model is the config's network with a workdir's checkpoint (or random
weights). Contenders, all with the same weights and checked to give the same
logits before anything is timed:

* jax: the jitted logits function (`model.apply(..., train=False)`);
* onnxruntime: the file written by `unet_jax.export --format=onnx`, loaded
  through `unet_jax.exported` (needs the 'export' extra);
* torch eager / torch compiled: `benchmarks/torch_peer.py` (channels_last, batch
  norm in eval mode) under `torch.inference_mode` (needs the 'peer' extra);
  only for the paper network (2x2 up-convolutions, no extra head).

At each size: batch 1 (latency: median and p99 over the calls, frames/s =
1 / median) and a throughput batch (frames/s = batch / median call). Calls
alternate between contenders round by round, so that a slower or busier
moment of the machine hits all of them alike. With --bfloat16 on a GPU the
JAX model and the compiled PyTorch model also run in bfloat16.
"""

import json
import pathlib
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from unet_jax import export  # pylint: disable=g-import-not-at-top,wrong-import-position
from unet_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position

config_flags.DEFINE_config_file('config', 'configs/carla.py', 'Model config.')
flags.DEFINE_string('workdir', '', 'Training workdir whose checkpoint to time (default: random).')
flags.DEFINE_string('checkpoint', 'best', "'best', 'latest' or a step.")
flags.DEFINE_list('sizes', ['train', '480x640'], "HxW sizes; 'train' is the config's size.")
flags.DEFINE_list('batches', ['1', '8'], 'Batch sizes: latency batch and throughput batch(es).')
flags.DEFINE_integer('rounds', 10, 'Timed calls per contender at batch 1 (fewer at larger work).')
flags.DEFINE_float('budget_s', 20.0, 'Rough seconds of timing per size and batch.')
flags.DEFINE_bool('torch', True, 'Time the PyTorch peer.')
flags.DEFINE_bool('torch_compile', True, 'Also time torch.compile.')
flags.DEFINE_bool('bfloat16', False, 'Also time bfloat16 (JAX, compiled PyTorch) on a GPU.')
flags.DEFINE_string('json', '', 'Write the results here as JSON.')
FLAGS = flags.FLAGS


def torch_weights(torch_model, variables, depth: int) -> None:
  """Copies unet_jax variables into `benchmarks.torch_peer.UNet` in place."""
  import torch  # pylint: disable=g-import-not-at-top
  params, stats = variables['params'], variables.get('batch_stats', {})
  tensor = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32)))

  def block(sequential, name):
    convs = [m for m in sequential if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in sequential if isinstance(m, torch.nn.BatchNorm2d)]
    for i, conv in enumerate(convs):
      p = params[name][f'conv{i}']
      conv.weight.data = tensor(np.transpose(p['kernel'], (3, 2, 0, 1)))
      if conv.bias is not None:
        conv.bias.data = tensor(p['bias'])
    for i, norm in enumerate(norms):
      norm.weight.data = tensor(params[name][f'bn{i}']['scale'])
      norm.bias.data = tensor(params[name][f'bn{i}']['bias'])
      norm.running_mean.data = tensor(stats[name][f'bn{i}']['mean'])
      norm.running_var.data = tensor(stats[name][f'bn{i}']['var'])

  for level in range(depth):
    block(torch_model.down[level], f'down{level}')
  block(torch_model.bottleneck, 'bottleneck')
  for index, level in enumerate(reversed(range(depth))):
    kernel = np.asarray(params[f'upconv{level}']['kernel'])  # (2, 2, in, out)
    # UpConv2x2 puts kernel[1-a, 1-b] at output offset (a, b); PyTorch puts weight[:, :, a, b].
    torch_model.upconv[index].weight.data = tensor(np.transpose(kernel[::-1, ::-1], (2, 3, 0, 1)))
    torch_model.upconv[index].bias.data = tensor(params[f'upconv{level}']['bias'])
    block(torch_model.up[index], f'up{level}')
  torch_model.classifier.weight.data = tensor(
      np.transpose(params['classifier']['kernel'], (3, 2, 0, 1)))
  torch_model.classifier.bias.data = tensor(params['classifier']['bias'])


def contenders(config, variables, onnx_dir: pathlib.Path) -> dict:
  """name -> fn(images float32 NHWC numpy) -> logits NHWC numpy (waits for the result)."""
  model = models.unet_from_config(config.model)
  forward = jax.jit(lambda x: model.apply(variables, x, train=False))
  result = {'jax': lambda x: np.asarray(forward(x))}
  if FLAGS.bfloat16 and jax.default_backend() == 'gpu':
    bf16 = model.clone(dtype=jnp.bfloat16)
    forward16 = jax.jit(lambda x: bf16.apply(variables, x, train=False))
    result['jax bfloat16'] = lambda x: np.asarray(forward16(x))
  try:
    from unet_jax import exported  # pylint: disable=g-import-not-at-top
    export.export_model(config, variables, 0, file_format='onnx', output_dir=onnx_dir)
    import onnxruntime  # pylint: disable=g-import-not-at-top
    options = onnxruntime.SessionOptions()
    # Idle ONNX Runtime threads would otherwise spin and take the cores from
    # the contender that runs next.
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    run, _ = exported.load_onnx(onnx_dir, session_options=options)
    result['onnxruntime'] = run
  except ImportError as error:
    print(f'onnxruntime skipped: {error}')
  if FLAGS.torch:
    try:
      result.update(torch_contenders(config, variables))
    except (ImportError, ValueError) as error:
      print(f'torch skipped: {error}')
  return result


def torch_contenders(config, variables) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_peer  # pylint: disable=g-import-not-at-top
  device = 'cuda' if jax.default_backend() == 'gpu' and torch.cuda.is_available() else 'cpu'
  net = torch_peer.unet_from_config(config.model)
  torch_weights(net, jax.tree.map(np.asarray, variables), config.model.depth)
  net = net.eval().to(device, memory_format=torch.channels_last)
  variants = {'torch eager': (net, None)}
  if FLAGS.torch_compile:
    variants['torch compiled'] = (torch.compile(net), None)
    if FLAGS.bfloat16 and device == 'cuda':
      variants['torch compiled bfloat16'] = (torch.compile(net), torch.bfloat16)
  result = {}
  for name, (module, dtype) in variants.items():
    def run(x, module=module, dtype=dtype):
      with torch.inference_mode(), torch.autocast(device, dtype=dtype or torch.float32,
                                                  enabled=dtype is not None):
        images = torch.from_numpy(x).permute(0, 3, 1, 2).to(device).contiguous(
            memory_format=torch.channels_last)
        return module(images).float().permute(0, 2, 3, 1).cpu().numpy()
    result[name] = run
  return result


def alternate(runs: dict, images: np.ndarray, rounds: int) -> dict[str, list[float]]:
  times = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      start = time.perf_counter()
      run(images)
      times[name].append(time.perf_counter() - start)
  return times


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.workdir:
    config, variables, _ = export.restore(FLAGS.workdir, FLAGS.checkpoint)
  else:
    model = models.unet_from_config(config.model)
    variables = model.init(jax.random.key(0), jnp.zeros((1, *config.data.image_size, 3)))
  variables = jax.tree.map(np.asarray, variables)
  with tempfile.TemporaryDirectory() as onnx_dir:
    runs = contenders(config, variables, pathlib.Path(onnx_dir))
    rows = []
    for size_text in FLAGS.sizes:
      size = (tuple(config.data.image_size) if size_text == 'train'
              else tuple(int(n) for n in size_text.split('x')))
      models.check_input_size(size, config.model.depth, config.model.padding)
      for batch_text in FLAGS.batches:
        batch = int(batch_text)
        images = np.random.default_rng(0).uniform(0, 1, (batch, *size, 3)).astype(np.float32)
        reference = runs['jax'](images)
        for name, run in runs.items():  # warm-up (compilation) and the same logits
          got = run(images)
          if 'bfloat16' not in name:
            error = float(np.abs(got - reference).max())
            assert error < 1e-3 * (1 + np.abs(reference).max()), (name, error)
        # Size the rounds from one timed call of each, to stay within the budget.
        once = sum(statistics.median(t) for t in alternate(runs, images, 1).values())
        rounds = max(3, min(FLAGS.rounds, int(FLAGS.budget_s / max(once, 1e-6))))
        times = alternate(runs, images, rounds)
        for name, seconds in times.items():
          median = statistics.median(seconds)
          rows.append({'runtime': name, 'size': list(size), 'batch': batch, 'calls': rounds,
                       'median_ms': 1e3 * median,
                       'p99_ms': 1e3 * float(np.percentile(seconds, 99)),
                       'frames_per_s': batch / median})
          print(f'{name:>24} {size[0]}x{size[1]} batch {batch:>2}: {batch / median:8.1f} frames/s '
                f'(median {1e3 * median:.1f} ms, p99 {rows[-1]["p99_ms"]:.1f} ms, '
                f'{rounds} calls)', flush=True)
  print('\n| runtime | size | batch | frames/s | median ms | p99 ms | calls |')
  print('|---|---|---|---|---|---|---|')
  for row in rows:
    print(f"| {row['runtime']} | {row['size'][0]}x{row['size'][1]} | {row['batch']} | "
          f"{row['frames_per_s']:.1f} | {row['median_ms']:.1f} | {row['p99_ms']:.1f} | "
          f"{row['calls']} |")
  if FLAGS.json:
    pathlib.Path(FLAGS.json).write_text(json.dumps(
        {'backend': jax.default_backend(), 'device': str(jax.devices()[0]), 'rows': rows},
        indent=1))


if __name__ == '__main__':
  app.run(main)
