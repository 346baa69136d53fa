"""Multi-process training through jax.distributed, on one machine.

Two processes on 127.0.0.1 (CPU devices, gloo collectives), each with 2
devices, train the tiny config on one global mesh of 4 devices; one process
with 4 devices trains the same config on the same data. Both must end with
the same parameters and evaluation metrics, and the two-process checkpoint
must restore in a single process. SIGTERM to one process stops both at the
same step with a checkpoint. A process may arrive 35 s after the other at
a device group's first use or with work the other waits for, and bad frames
stop both processes with one line each. Every process runs in its own
session and is killed with its group whatever the outcome, so none outlives
the test.
"""

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, saved_params
from unet_jax import checkpointing
from unet_jax import distributed

RUN_TIMEOUT_S = 300
NUM_EPOCHS = 2

# The CLI form of conftest.tiny_config, without batch norm: its statistics are
# summed over the processes in another order than over one process's devices,
# and Adam turns those rounding differences (1e-7) into 1e-4 differences of the
# parameters whose gradients are near zero; the parameters are compared to 1e-5.
TINY_CONFIG_FLAGS = (
    '--config=configs/synthetic.py:smoke', '--config.data.synthetic_scenes=0',
    '--config.data.split_key=name', '--config.data.validation_fraction=0.25',
    '--config.data.test_fraction=0.0', '--config.batch_size=4',
    f'--config.num_epochs={NUM_EPOCHS}', '--config.log_every_steps=2',
    '--config.checkpoint_every_steps=3', '--config.model.dropout_rate=0.3',
    '--config.model.use_batch_norm=False')


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _running(commands, log_paths, env):
  """Starts one process per command, each in its own session, its output to its log.

  Yields the processes; on exit, whatever happened, kills every process
  group, so that nothing outlives the test.
  """
  processes = []
  try:
    for command, log_path in zip(commands, log_paths):
      with log_path.open('w') as log:  # a file, not a pipe: nobody must read it for progress
        processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    yield processes
  finally:
    for p in processes:  # the whole group, so that no child of a process outlives it either
      with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()


def _cpu_env(devices_per_process: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices_per_process}')


@contextlib.contextmanager
def _started(data_dir, workdir, *, num_processes: int, devices_per_process: int,
             extra_flags=()):
  """Runs `unet_jax.main` in `num_processes` processes; yields them and their logs."""
  command = [sys.executable, '-m', 'unet_jax.main', f'--workdir={workdir}', *TINY_CONFIG_FLAGS,
             f'--config.data.data_dir={data_dir}', *extra_flags]
  if num_processes > 1:
    command += [f'--coordinator_address=127.0.0.1:{_free_port()}',
                f'--num_processes={num_processes}']
  commands = [command + ([f'--process_id={i}'] if num_processes > 1 else [])
              for i in range(num_processes)]
  log_paths = [pathlib.Path(f'{workdir}.process{i}.log') for i in range(num_processes)]
  with _running(commands, log_paths, _cpu_env(devices_per_process)) as processes:
    yield processes, log_paths


def _finished(processes, log_paths, deadline: float) -> list[str]:
  """Waits for every process to exit 0 (or fails); returns their logs."""
  # One failed process leaves the others waiting in collectives: stop at the first failure.
  while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
    if any(p.poll() not in (None, 0) for p in processes):
      break
    time.sleep(0.2)
  logs = [path.read_text() for path in log_paths]
  outcomes = ['is still running' if p.poll() is None else f'exited with {p.returncode}'
              for p in processes]
  if any(p.returncode != 0 for p in processes):
    # Every process's end: the one that failed first is often not process 0.
    pytest.fail('\n'.join(f'process {i} {outcome}:\n{log[-3000:]}'
                          for i, (outcome, log) in enumerate(zip(outcomes, logs))), pytrace=False)
  return logs


def _train(data_dir, workdir, **launch) -> list[str]:
  with _started(data_dir, workdir, **launch) as (processes, log_paths):
    return _finished(processes, log_paths, time.monotonic() + RUN_TIMEOUT_S)


def _metric_lines(workdir) -> list[dict]:
  return [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').open()]



@pytest.fixture(scope='module')
def one_process_run(synthetic_dir, tmp_path_factory):
  """The reference: one process with 4 devices (device-cache mode)."""
  workdir = tmp_path_factory.mktemp('multihost') / 'one_process'
  _train(synthetic_dir, workdir, num_processes=1, devices_per_process=4)
  return workdir


# Tiny splits: 'auto' keeps them on the devices; 'never' streams them, each
# process decoding only its own half of every global batch.
@pytest.mark.parametrize('device_cache', ['auto', 'never'])
def test_two_processes_train_like_one_process_with_the_same_devices(
    synthetic_dir, one_process_run, tmp_path, device_cache):
  workdir = tmp_path / 'two_processes'
  logs = _train(synthetic_dir, workdir, num_processes=2, devices_per_process=2,
                extra_flags=[f'--config.data.device_cache={device_cache}'])
  for process_id, log in enumerate(logs):
    assert f'jax.distributed: process {process_id} of 2' in log

  # The two-process checkpoint restores here, in one process, and equals the reference.
  step_2, params_2 = saved_params(workdir)
  step_1, params_1 = saved_params(one_process_run)
  assert step_2 == step_1 > 0
  np.testing.assert_allclose(params_2, params_1, rtol=0, atol=1e-5)

  # Only process 0 wrote logs: each line once, one event file, one config.
  lines_2, lines_1 = _metric_lines(workdir), _metric_lines(one_process_run)
  assert [sorted(line) for line in lines_2] == [sorted(line) for line in lines_1]
  assert [line['step'] for line in lines_2] == [line['step'] for line in lines_1]
  assert len(list((workdir / 'tensorboard').glob('events.out.tfevents.*'))) == 1
  assert checkpointing.load_config(str(workdir)).data.device_cache == device_cache
  assert 'Final validation metrics' in logs[0] and 'Final validation metrics' not in logs[1]

  # Evaluation covers the whole split over both processes: the same metrics.
  evals_2 = [line for line in lines_2 if 'validation_mean_iou' in line]
  evals_1 = [line for line in lines_1 if 'validation_mean_iou' in line]
  assert len(evals_2) == len(evals_1) == NUM_EPOCHS
  for eval_2, eval_1 in zip(evals_2, evals_1):
    for name in ('validation_loss', 'validation_pixel_accuracy', 'validation_mean_iou',
                 'validation_mean_class_accuracy'):
      assert eval_2[name] == pytest.approx(eval_1[name], rel=1e-5, abs=1e-6), name
  train_2 = [line['train_loss'] for line in lines_2 if 'train_loss' in line]
  train_1 = [line['train_loss'] for line in lines_1 if 'train_loss' in line]
  np.testing.assert_allclose(train_2, train_1, rtol=1e-5)


def test_sigterm_to_one_process_stops_both_at_the_same_step(synthetic_dir, tmp_path):
  workdir = tmp_path / 'preempted'
  deadline = time.monotonic() + RUN_TIMEOUT_S
  with _started(synthetic_dir, workdir, num_processes=2, devices_per_process=2,
                extra_flags=['--config.num_epochs=1000']) as (processes, log_paths):
    metrics = workdir / 'metrics.jsonl'
    while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:
      assert all(p.poll() is None for p in processes), log_paths[0].read_text()[-4000:]
      time.sleep(0.2)
    processes[1].send_signal(signal.SIGTERM)  # a preemption of process 1 alone
    logs = _finished(processes, log_paths, deadline)
  stops = [re.search(r'Stopped at step (\d+) \((.+?)\)', log) for log in logs]
  assert all(stops), 'a process did not report its stop'
  assert [stop.group(2) for stop in stops] == ['a signal to another process', 'SIGTERM']
  step = int(stops[0].group(1))
  assert int(stops[1].group(1)) == step and step % 2 == 0  # agreed at a log step
  assert checkpointing.create_manager(str(workdir), checkpointing.load_config(str(workdir)),
                                      read_only=True).latest_step() == step


# Two processes meet in `distributed.initialize`; then process 0 arrives 35 s
# late at a device group's first use (gloo gives up connecting a group after
# 30 s) or with work the others wait for; process 1 must wait and both go on.
_LATE_PROCESS = """
import sys, time
import jax, numpy as np
from jax.experimental import multihost_utils
from unet_jax import distributed
port, process_id, group, late_s = sys.argv[1:]
distributed.initialize('on', f'127.0.0.1:{port}', 2, int(process_id))
if jax.process_index() == 0:
  time.sleep(float(late_s))
start = time.monotonic()
if group == 'every device':  # the train step's gradient sum
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  x = jax.make_array_from_process_local_data(
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')),
      np.full((2, 3), jax.process_index() + 1, np.float32), (4, 3))
  total = jax.jit(lambda x: (x * x).sum(0), out_shardings=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))(x)
  result = np.asarray(total.addressable_data(0)).tolist()
elif group == 'one device per process':  # multihost_utils, Orbax
  result = multihost_utils.process_allgather(np.int32(jax.process_index())).tolist()
else:  # the others while process 0 prepares the data
  result = distributed.process_0_first(lambda: 'passed', 'the late work', timeout_s=600)
print('result', result, 'waited', time.monotonic() - start, flush=True)
"""
LATE_S = 35


@pytest.mark.parametrize('group, expected', [
    ('every device', '[10.0, 10.0, 10.0]'),  # 2 rows of 1 and 2 rows of 2, squared and summed
    ('one device per process', '[0, 1]'),
    ('process 0 first', 'passed')])
def test_a_process_may_arrive_late(group, expected, tmp_path):
  port = str(_free_port())
  commands = [[sys.executable, '-c', _LATE_PROCESS, port, str(i), group, str(LATE_S)]
              for i in range(2)]
  log_paths = [tmp_path / f'late{i}.log' for i in range(2)]
  with _running(commands, log_paths, _cpu_env(2)) as processes:
    logs = _finished(processes, log_paths, time.monotonic() + LATE_S + 120)
  results = [re.search(r'^result (.*) waited (.*)$', log, re.MULTILINE) for log in logs]
  assert all(results), logs
  assert [result.group(1) for result in results] == [expected, expected]
  waited = [float(result.group(2)) for result in results]
  assert waited[1] > LATE_S - 5 > waited[0], waited  # process 1 was held for process 0


def test_bad_data_stops_every_process_with_one_line(synthetic_dir, tmp_path):
  bad_dir = tmp_path / 'frames'
  shutil.copytree(synthetic_dir, bad_dir)
  (bad_dir / 'CameraMask' / '000003.png').unlink()
  with _started(bad_dir, tmp_path / 'bad', num_processes=2, devices_per_process=2) as (
      processes, log_paths):
    deadline = time.monotonic() + 120
    while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
      time.sleep(0.2)
    codes = [p.poll() for p in processes]
    logs = [path.read_text() for path in log_paths]
  assert codes == [1, 1], logs
  problem = 'CameraRGB/000003.png: image without a mask (CameraMask/000003.png is missing)'
  errors_0 = [line for line in logs[0].splitlines() if line.startswith('error:')]
  errors_1 = [line for line in logs[1].splitlines() if line.startswith('error:')]
  assert len(errors_0) == len(errors_1) == 1, logs
  assert problem in errors_0[0]
  assert errors_1[0].startswith('error: process 0 failed at preparing the frames: ')
  assert problem in errors_1[0]
  assert 'Traceback' not in logs[0] + logs[1]


def test_auto_mode_starts_only_when_the_environment_names_a_cluster():
  assert not distributed.cluster_requested({})
  assert distributed.cluster_requested({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'})
  srun = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'gpu[1-2]', 'SLURM_NTASKS': '2',
          'SLURM_PROCID': '0', 'SLURM_LOCALID': '0', 'SLURM_STEP_NUM_NODES': '2'}
  assert distributed.cluster_requested(srun)
  assert not distributed.cluster_requested({**srun, 'SLURM_NTASKS': '1'})  # a single task
  assert not distributed.cluster_requested({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '2'})  # batch
  assert distributed.cluster_requested({'TPU_WORKER_HOSTNAMES': 'w-0,w-1'})
  assert not distributed.cluster_requested({'TPU_WORKER_HOSTNAMES': 'w-0'})
  with pytest.raises(ValueError, match='distributed must be one of'):
    distributed.initialize('yes')
  assert not distributed.initialize('off', coordinator_address='127.0.0.1:1')


def test_one_slurm_task_per_node_gets_every_gpu_of_its_node():
  per_node = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'gpu[1-2]', 'SLURM_NTASKS': '2',
              'SLURM_PROCID': '1', 'SLURM_LOCALID': '0', 'SLURM_STEP_NUM_NODES': '2',
              'SLURM_GPUS_ON_NODE': '4'}
  assert distributed.slurm_local_device_ids(per_node) == [0, 1, 2, 3]
  # One task per GPU: JAX's own choice (task i of a node gets GPU i) stands.
  assert distributed.slurm_local_device_ids({**per_node, 'SLURM_NTASKS': '8'}) is None
  assert distributed.slurm_local_device_ids({**per_node, 'JAX_LOCAL_DEVICE_IDS': '0'}) is None
  assert distributed.slurm_local_device_ids({**per_node, 'SLURM_GPUS_ON_NODE': '1'}) is None
  assert distributed.slurm_local_device_ids({}) is None
