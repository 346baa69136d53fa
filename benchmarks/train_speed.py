r"""Speed of the train step, against the same U-Net in PyTorch on the same machine.

    python -m benchmarks.train_speed --config=configs/carla.py --json=benchmark.json
    python -m benchmarks.train_speed --config=configs/carla.py --peer=torch   # needs '.[peer]'
    python -m benchmarks.train_speed --config=configs/synthetic.py --loop_steps=30

Measures, for the config's model and batch size: compile time; the median
time of the real jitted train step (`train.compile_train_step`) on random
batches after warm-up, waiting for each step to finish; evaluation images/s;
peak host memory (and device memory where the device reports it); the step's
FLOPs (those of its convolutions and matrix products, counted on the traced
step; XLA's own cost analysis beside them) over its time, next to float32
and bfloat16 matrix-product peaks timed in turns with the step (so both see
the same machine load).

`--peer=torch` times `benchmarks.torch_peer` (the identical network, checked by
parameter count first; channels_last; and torch.compile unless
`--notorch_compile`) with Adam and cross-entropy on the same batches,
alternating with the JAX step `--rounds` times so that machine noise hits
both, and reports the ratio. `--loop_steps` also runs the training loop
itself (`train.train_and_evaluate`) on the config's data and reports the
images/s it logs against the pure step's.

A tool, not part of the library: run it from the repository root.
"""

import copy
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
from jaxlib import version as jaxlib_version
from ml_collections import config_flags
import numpy as np

from unet_jax import evaluation
from unet_jax import metric_logging
from unet_jax import models
from unet_jax import sharding
from unet_jax import train
from unet_jax import xla_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training config file (Python).',
                                lock_config=True)
flags.DEFINE_enum('peer', '', ['', 'torch'], 'Also time the same U-Net in this framework.')
flags.DEFINE_bool('torch_compile', True, 'With --peer=torch, also time torch.compile.')
flags.DEFINE_integer('steps', 3, 'Timed train steps per contender per round.')
flags.DEFINE_integer('rounds', 3, 'Rounds that alternate the contenders.')
flags.DEFINE_integer('warmup', 2, 'Untimed steps per contender after compilation.')
flags.DEFINE_integer('eval_steps', 5, 'Timed evaluation steps.')
flags.DEFINE_integer('loop_steps', 0, 'If > 0, time this many steps of the training loop '
                     "on the config's data against the pure step.")
flags.DEFINE_integer('matmul_size', 0, 'Side of the square matrices of the peak measurement; '
                     '0: 2048 on CPU, 8192 on an accelerator (a GPU needs large products '
                     'to reach its peak).')
flags.DEFINE_string('json', None, 'Write the results here as JSON.')
flags.mark_flags_as_required(['config'])

NUM_RANDOM_BATCHES = 3


# --------------------------------------------------------------------------
# Measurements.


def wall_seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def matmul_step(dtype, size: int):
  """A callable running one jitted square matrix product in `dtype` (float32
  accumulation) to completion, and its FLOPs. Timed in turns with the train
  step, so that the peak and the step see the same machine load."""
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.random.normal(k, (size, size), dtype) for k in keys)
  product = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  return lambda: product(a, b).block_until_ready(), 2 * size**3


def random_batches(config, count: int, seed: int = 0) -> list[dict]:
  """Host batches of uniform images and uniformly drawn labels, all valid."""
  rng = np.random.default_rng(seed)
  height, width = config.data.image_size
  label_size = models.label_size(config.model, (height, width))
  size = config.batch_size
  return [{'image': rng.random((size, height, width, 3), np.float32),
           'label': rng.integers(0, config.model.num_classes, (size, *label_size), np.int32),
           'valid': np.ones((size,), bool)} for _ in range(count)]


def parameter_count(params) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


class JaxTrainStep:
  """The project's compiled train step, called on rotating device batches."""

  def __init__(self, config, mesh, host_batches):
    model = models.unet_from_config(config.model)
    learning_rate_fn = train.create_learning_rate_fn(config, steps_per_epoch=100)
    init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
    self.state = train.create_replicated_train_state(config, model, learning_rate_fn,
                                                     init_key, mesh)
    self.dropout_key = jax.device_put(dropout_key, sharding.replicated(mesh))
    self.batches = [jax.device_put(b, sharding.data_sharded(mesh)) for b in host_batches]
    step = train.compile_train_step(config, mesh, learning_rate_fn, class_weights=None)
    start = time.perf_counter()
    lowered = step.lower(self.state, self.batches[0], self.dropout_key)
    self.compiled = lowered.compile()
    self.compile_seconds = time.perf_counter() - start
    # Counted on the traced program, before any backend rewrites it: a GPU's
    # compiled step calls cuDNN for its convolutions, which XLA's cost
    # analysis leaves out (and jaxlib 0.11's GPU cost analysis of the lowered
    # step reports nothing).
    self.flops = matmul_flops(jax.make_jaxpr(step)(self.state, self.batches[0],
                                                   self.dropout_key))
    self.xla_flops = float(_cost(lowered).get('flops', 0.0))
    self.parameter_count = parameter_count(self.state.params)
    self.model = model
    self._calls = 0

  def dispatch(self, batch=None):
    """Queues one step (on `batch`, else the next resident one); returns its metrics."""
    if batch is None:
      batch = self.batches[self._calls % len(self.batches)]
      self._calls += 1
    self.state, metrics = self.compiled(self.state, batch, self.dropout_key)
    return metrics

  def __call__(self):
    jax.block_until_ready((self.dispatch(), self.state))


def matmul_flops(closed_jaxpr) -> float:
  """2 x the multiply-adds of every convolution and matrix product in a jaxpr.

  The usual "model FLOPs" of utilisation figures: element-wise work is left
  out. Nested jaxprs (jit, custom derivatives, remat) are counted where they
  appear, a scan's body `length` times, a cond's costliest branch.
  """
  total = 0.0
  for eqn in closed_jaxpr.jaxpr.eqns:
    name = eqn.primitive.name
    if name in ('dot_general', 'conv_general_dilated'):
      lhs, rhs = (var.aval.shape for var in eqn.invars[:2])
      outputs = math.prod(eqn.outvars[0].aval.shape)
      if name == 'dot_general':
        (lhs_contracting, _), _ = eqn.params['dimension_numbers']
        per_output = math.prod(lhs[d] for d in lhs_contracting)
      else:
        rhs_spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, *spatial)
        per_output = math.prod(rhs[d] for d in rhs_spec[1:])
      total += 2.0 * outputs * per_output
      continue
    nested = []
    for value in eqn.params.values():
      for item in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(item, 'eqns'):
          nested.append(jax_core.ClosedJaxpr(item, ()))
        elif hasattr(getattr(item, 'jaxpr', None), 'eqns'):
          nested.append(item)
    counts = [matmul_flops(jaxpr) for jaxpr in nested]
    if name == 'cond':
      total += max(counts, default=0.0)
    else:
      total += sum(counts) * (eqn.params['length'] if name == 'scan' else 1)
  return total


def _cost(stage) -> dict:
  cost = stage.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else (cost or {})


def eval_images_per_second(config, mesh, jax_step: JaxTrainStep, steps: int) -> float:
  eval_step = evaluation.compile_eval_step(config, mesh, jax_step.model)
  variables = train.model_variables(jax_step.state)
  batches = jax_step.batches
  jax.block_until_ready(eval_step(variables, batches[0]))
  times = [wall_seconds(lambda i=i: jax.block_until_ready(
      eval_step(variables, batches[i % len(batches)]))) for i in range(steps)]
  return config.batch_size / statistics.median(times)


def torch_contenders(config, host_batches, expected_parameters: int, compile_model: bool):
  """name -> step callable for the PyTorch peer (channels_last; compiled too)."""
  import torch  # pylint: disable=g-import-not-at-top  (optional extra)
  from benchmarks import torch_peer  # pylint: disable=g-import-not-at-top

  torch.manual_seed(config.seed)
  # Where JAX runs on a GPU, so does the peer (cuDNN picking its fastest kernels).
  device = 'cuda' if jax.default_backend() == 'gpu' and torch.cuda.is_available() else 'cpu'
  torch.backends.cudnn.benchmark = True
  autocast_dtype = torch.bfloat16 if config.model.dtype == 'bfloat16' else None
  batches = [torch_peer.to_torch_batch(b['image'], b['label'], channels_last=True, device=device)
             for b in host_batches]
  contenders, notes = {}, {}
  variants = [('torch channels_last', False)] + ([('torch.compile', True)] if compile_model else [])
  for name, compiled in variants:
    model = torch_peer.unet_from_config(config.model).to(device,
                                                         memory_format=torch.channels_last)
    count = torch_peer.parameter_count(model)
    if count != expected_parameters:
      raise ValueError(f'the PyTorch peer has {count:,} parameters, unet_jax '
                       f'{expected_parameters:,}: not the same network')
    model.train()
    step = torch_peer.create_train_step(model, config.learning_rate, compile_model=compiled,
                                        autocast_dtype=autocast_dtype)

    def call(step=step, calls=iter(range(sys.maxsize))):
      images, labels = batches[next(calls) % len(batches)]
      step(images, labels).item()  # .item() waits for the step

    try:
      notes[name] = {'compile_seconds': wall_seconds(call)}
    except Exception as error:  # pylint: disable=broad-except  (torch.compile may not work)
      notes[name] = {'error': f'{type(error).__name__}: {error}'[:300]}
      continue
    contenders[name] = call
  return contenders, notes, f'{torch.__version__} on {device}' + (
      ', bfloat16 autocast' if autocast_dtype else '')


def alternate(contenders: dict, rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
  """Seconds per step of each contender, timed in turns so noise hits all."""
  for call in contenders.values():
    for _ in range(warmup):
      call()
  times = {name: [] for name in contenders}
  for _ in range(rounds):
    for name, call in contenders.items():
      times[name].extend(wall_seconds(call) for _ in range(steps))
  return times


def loop_images_per_second(config, jax_step: JaxTrainStep, steps: int,
                           workdir: str) -> tuple[float, float]:
  """(loop, pure) images/s: the training loop's own figure, and the pure step's.

  The loop figure is the one `train.train_and_evaluate` logs itself
  (`images_per_second` in metrics.jsonl: the wall time between log steps,
  which holds the pipeline handing over batches, dispatching the steps,
  fetching the metrics and writing them), run on the config's data for about
  `steps` steps after one log interval of warm-up (compilation), with no
  evaluation in between. The pure figure is the same number of steps on
  resident batches, dispatched the same way and waited for once at the end.
  """
  config = copy.deepcopy(config)
  with config.unlocked():
    config.eval_every_epochs = 10**6
    config.num_epochs = 10**6
    config.checkpoint_every_steps = 10**9
  log_every = config.log_every_steps
  intervals = max(2, -(-steps // log_every))
  train.train_and_evaluate(config, workdir, stop_at_step=log_every * (1 + intervals))
  with open(os.path.join(workdir, metric_logging.METRICS_FILE)) as f:
    rows = [json.loads(line) for line in f]
  rates = [row['images_per_second'] for row in rows if 'images_per_second' in row][1:]
  timed_steps = log_every * len(rates)
  jax_step()  # warm
  start = time.perf_counter()
  for _ in range(timed_steps):
    jax_step.dispatch()
  jax.block_until_ready(jax_step.state)
  pure = timed_steps * config.batch_size / (time.perf_counter() - start)
  return statistics.median(rates), pure


def machine_description() -> dict:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return {'cpu': cpu, 'cores': os.cpu_count(), 'devices': [str(d) for d in jax.devices()],
          'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jaxlib_version.__version__,
          'xla_flags': os.environ.get('XLA_FLAGS', '')}


def device_peak_memory_mb() -> float | None:
  peaks = [stats.get('peak_bytes_in_use') for stats in
           (device.memory_stats() for device in jax.local_devices()) if stats]
  peaks = [p for p in peaks if p]
  return max(peaks) / 2**20 if peaks else None


# --------------------------------------------------------------------------
# The run.


def run(config, *, peer: str = '', torch_compile: bool = True, steps: int = 3, rounds: int = 3,
        warmup: int = 2, eval_steps: int = 5, loop_steps: int = 0,
        matmul_size: int = 0) -> dict:
  """All measurements for `config`; returns the results as a JSON-able dict."""
  mesh = sharding.create_mesh()
  host_batches = random_batches(config, NUM_RANDOM_BATCHES, seed=config.seed)
  jax_step = JaxTrainStep(config, mesh, host_batches)
  results = {
      'machine': machine_description(),
      'config': {'image_size': list(config.data.image_size), 'batch_size': config.batch_size,
                 'base_filters': config.model.base_filters, 'depth': config.model.depth,
                 'num_classes': config.model.num_classes, 'dtype': config.model.dtype},
      'parameters': jax_step.parameter_count,
      'compile_seconds': jax_step.compile_seconds,
      'step_gflop': jax_step.flops / 1e9,
      'step_gflop_xla': jax_step.xla_flops / 1e9,
  }
  matmul_size = matmul_size or (2048 if jax.default_backend() == 'cpu' else 8192)
  matmuls = {f'matmul {jnp.dtype(dtype).name}': matmul_step(dtype, matmul_size)
             for dtype in (jnp.float32, jnp.bfloat16)}
  contenders = {'unet_jax': jax_step, **{name: call for name, (call, _) in matmuls.items()}}
  if peer == 'torch':
    torch_steps, notes, version = torch_contenders(config, host_batches,
                                                   jax_step.parameter_count, torch_compile)
    contenders.update(torch_steps)
    results['peer'] = {'framework': 'torch', 'version': version, 'notes': notes}
  times = alternate(contenders, rounds, steps, warmup)
  seconds = {name: statistics.median(t) for name, t in times.items()}
  # The peak is the fastest product seen: a conservative denominator under load.
  results['matmul_peak_gflops'] = {
      name.split()[1]: flops / 1e9 / min(times.pop(name)) for name, (_, flops) in matmuls.items()}
  for name in matmuls:
    seconds.pop(name)
  results['matmul_size'] = matmul_size
  results['train_step_seconds'] = seconds['unet_jax']
  results['train_step_seconds_all'] = times['unet_jax']
  results['train_images_per_second'] = config.batch_size / seconds['unet_jax']
  results['achieved_gflops'] = jax_step.flops / 1e9 / seconds['unet_jax']
  peak_key = 'bfloat16' if config.model.dtype == 'bfloat16' else 'float32'
  results['percent_of_matmul_peak'] = (100 * results['achieved_gflops'] /
                                       results['matmul_peak_gflops'][peak_key])
  if peer:
    results['peer']['images_per_second'] = {
        name: config.batch_size / s for name, s in seconds.items() if name != 'unet_jax'}
    results['peer']['step_seconds_all'] = {name: times[name] for name in seconds
                                           if name != 'unet_jax'}
    # > 1: unet_jax is faster.
    results['peer']['speed_ratio'] = {
        name: s / seconds['unet_jax'] for name, s in seconds.items() if name != 'unet_jax'}
  results['eval_images_per_second'] = eval_images_per_second(config, mesh, jax_step, eval_steps)
  if loop_steps:
    with tempfile.TemporaryDirectory() as workdir:
      loop, pure = loop_images_per_second(config, jax_step, loop_steps, workdir)
    results['loop'] = {'loop_images_per_second': loop, 'pure_step_images_per_second': pure,
                       'overhead_percent': 100 * (1 - loop / pure)}
  results['peak_host_memory_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  results['device_peak_memory_mb'] = device_peak_memory_mb()
  return results


def format_table(results: dict) -> str:
  rows = [
      ('machine', f"{results['machine']['cpu']}, {results['machine']['cores']} cores"),
      ('versions', f"jax {results['machine']['jax']}, jaxlib {results['machine']['jaxlib']}, "
                   f"python {results['machine']['python']}"
                   + (f", torch {results['peer']['version']}" if 'peer' in results else '')),
      ('XLA_FLAGS', results['machine']['xla_flags'] or '(none)'),
      ('setting', '{image_size[0]}x{image_size[1]}, batch {batch_size}, base {base_filters}, '
       '{dtype}'.format(**results['config'])),
      ('parameters', f"{results['parameters']:,}"),
      ('compile', f"{results['compile_seconds']:.1f} s"),
      ('train step (median)', f"{results['train_step_seconds']:.3f} s"),
      ('train images/s', f"{results['train_images_per_second']:.2f}"),
      ('eval images/s', f"{results['eval_images_per_second']:.2f}"),
      ('step GFLOP', f"{results['step_gflop']:.1f} (convolutions and products; "
                     f"XLA's count: {results['step_gflop_xla']:.1f})"),
      ('achieved GFLOP/s', f"{results['achieved_gflops']:.1f}"),
      (f"matmul {results['matmul_size']}^2 GFLOP/s", 'f32 {float32:.0f}, bf16 {bfloat16:.0f}'
       .format(**results['matmul_peak_gflops'])),
      ('% of matmul peak', f"{results['percent_of_matmul_peak']:.1f}"),
      ('peak host memory', f"{results['peak_host_memory_mb']:.0f} MB"),
  ]
  if results['device_peak_memory_mb'] is not None:
    rows.append(('peak device memory', f"{results['device_peak_memory_mb']:.0f} MB"))
  if 'peer' in results:
    peer = results['peer']
    for name, images in peer['images_per_second'].items():
      rows.append((f'{name} images/s', f'{images:.2f}'))
      rows.append((f'unet_jax speed / {name}', f"{peer['speed_ratio'][name]:.2f}x"))
    for name, note in peer['notes'].items():
      if 'error' in note:
        rows.append((f'{name}', f"failed: {note['error']}"))
  if 'loop' in results:
    loop = results['loop']
    rows.append(('training loop images/s', f"{loop['loop_images_per_second']:.2f} "
                 f"(pure step {loop['pure_step_images_per_second']:.2f}, "
                 f"overhead {loop['overhead_percent']:.1f}%)"))
  width = max(len(name) for name, _ in rows)
  return '\n'.join(f'{name:<{width}}  {value}' for name, value in rows)


def write_json(path: str, results: dict) -> None:
  with open(path, 'w') as f:
    json.dump(results, f, indent=2)


def main(argv):
  xla_flags.set_default_flags()  # before JAX starts: XLA reads XLA_FLAGS once
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  results = run(FLAGS.config, peer=FLAGS.peer, torch_compile=FLAGS.torch_compile,
                steps=FLAGS.steps, rounds=FLAGS.rounds, warmup=FLAGS.warmup,
                eval_steps=FLAGS.eval_steps, loop_steps=FLAGS.loop_steps,
                matmul_size=FLAGS.matmul_size)
  print(format_table(results))
  if FLAGS.json:
    write_json(FLAGS.json, results)


if __name__ == '__main__':
  app.run(main)
