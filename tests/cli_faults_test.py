"""Each command on each kind of bad input: exit status 1, one `error:` line
naming the file or field and the problem, no traceback, nothing written to
the data folder and the workdir's checkpoints unchanged (README, Reliability)."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from unet_jax import carla_files
from unet_jax import synthetic




def _snapshot(folder: pathlib.Path) -> dict:
  """Every path under `folder` with a hash of its bytes (links by their target)."""
  if not folder.exists():
    return {}
  result = {}
  for path in sorted(folder.rglob('*')):
    if path.is_symlink():
      result[str(path)] = 'link:' + os.readlink(path)
    elif path.is_file():
      result[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    else:
      result[str(path)] = 'folder'
  return result


def _main(data, workdir, *extra):
  return ['unet_jax.main', '--config=configs/synthetic.py:smoke', f'--workdir={workdir}',
          f'--config.data.data_dir={data}', '--config.data.synthetic_scenes=0',
          '--config.data.split_key=name', '--config.data.validation_fraction=0.25',
          '--config.data.test_fraction=0.0', '--config.num_epochs=1', *extra]


def _case(name, t):
  """(argv, expected message parts) for case `name`; `t` holds the folders."""
  data, workdir, out = t['data'], t['workdir'], t['out']
  last = t['last_step']
  if name == 'main: config choice':
    return _main(data, t['new_workdir'], '--config.class_weighting=foo'), [
        "class_weighting must be one of 'none', 'inverse', 'median', got 'foo'"]
  if name == 'main: contradicting fields':
    return _main(data, t['new_workdir'], '--config.model.pretrained=True'), [
        'model.pretrained needs an EfficientNet encoder']
  if name == 'main: infinite learning rate':
    return _main(data, t['new_workdir'], '--config.learning_rate=inf'), [
        'learning_rate must be a finite number > 0, got inf']
  if name == 'main: missing data folder':
    return _main(data / 'nothing', t['new_workdir']), [f'{data}/nothing/CameraRGB: missing folder']
  if name == 'main: corrupt PNG':
    (data / 'CameraRGB' / '000003.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    return _main(data, t['new_workdir']), [f'{data}/CameraRGB/000003.png: corrupt or truncated',
                                           'skip_bad_pairs']
  if name == 'main: mask value out of range':
    carla_files.write_mask(data / 'CameraMask' / '000002.png', np.full((40, 56), 200, np.uint8))
    return _main(data, t['new_workdir']), [f'{data}/CameraMask/000002.png: mask value 200']
  if name == 'main: dangling link':
    (data / 'CameraRGB' / 'zz.png').symlink_to(data / 'gone.png')
    return _main(data, t['new_workdir']), [f'{data}/CameraRGB/zz.png: dangling link']
  if name == 'main: unwritable workdir':
    (t['tmp'] / 'a_file').write_text('x')
    return _main(data, t['tmp'] / 'a_file' / 'run'), ['a_file/run is not writable']
  if name == 'main: damaged config.json':
    (workdir / 'config.json').write_text('{"model": ')
    return _main(data, workdir), [f'{workdir}/config.json is not valid JSON']
  if name == 'evaluate: not a workdir':
    return ['unet_jax.evaluate', f'--workdir={t["tmp"]}'], [
        f'{t["tmp"]}/config.json does not exist']
  if name == 'evaluate: unknown step':
    return ['unet_jax.evaluate', f'--workdir={workdir}', '--checkpoint=999'], [
        'has no checkpoint at step 999; saved steps']
  if name == 'evaluate: corrupt checkpoint':
    for path in (workdir / 'checkpoints' / str(last)).rglob('*'):
      if path.is_file() and path.parent.name == 'd':
        path.write_bytes(b'\x00' * 64)
    return ['unet_jax.evaluate', f'--workdir={workdir}', '--checkpoint=latest'], [
        f'checkpoint {workdir}/checkpoints/{last} cannot be read', 'other saved steps']
  if name == 'evaluate: bad folder':
    (data / 'CameraMask' / '000001.png').write_bytes(b'')
    return ['unet_jax.evaluate', f'--workdir={workdir}', '--checkpoint=latest',
            f'--data_dir={data}'], [f'{data}/CameraMask/000001.png: empty file',
                                    '--skip_bad_pairs']
  if name == 'evaluate: unwritable report folder':
    shutil.rmtree(workdir / 'eval', ignore_errors=True)
    (workdir / 'eval').write_text('x')
    return ['unet_jax.evaluate', f'--workdir={workdir}', '--checkpoint=latest'], [
        f'report folder {workdir}/eval is not writable']
  if name == 'evaluate: bad eval size':
    return ['unet_jax.evaluate', f'--workdir={workdir}', '--eval_size=480'], [
        "eval_size must be height,width (two positive integers) or 'model', got ['480']"]
  if name == 'predict: bad test-time scales':
    return ['unet_jax.predict', f'--workdir={workdir}', f'--input={data}/CameraRGB',
            f'--output={out}', '--tta_scales=1.0,-0.5'], [
        'tta scales must be positive numbers, at least one']
  if name == 'predict: negative prior correction':
    return ['unet_jax.predict', f'--workdir={workdir}', f'--input={data}/CameraRGB',
            f'--output={out}', '--prior_correction=-1'], [
        'prior_correction must be a finite number >= 0, got -1.0']
  if name == 'evaluate: no class weights':
    (workdir / 'class_weights.json').unlink()
    return ['unet_jax.evaluate', f'--workdir={workdir}', '--checkpoint=latest',
            '--prior_correction=0.25'], [
        f'{workdir}/class_weights.json does not exist', 'run its training command again']
  if name == 'evaluate: ensemble of another split':
    other = t['tmp'] / 'other_split'
    shutil.copytree(workdir, other)
    config = json.loads((other / 'config.json').read_text())
    config['data']['validation_fraction'] = 0.5
    (other / 'config.json').write_text(json.dumps(config))
    return ['unet_jax.evaluate', f'--workdir={workdir}', '--checkpoint=latest',
            f'--ensemble={other}'], [
        f'{other}: trained on another split of the data than {workdir}',
        'data.validation_fraction']
  if name == 'predict: missing ensemble member':
    return ['unet_jax.predict', f'--workdir={workdir}', f'--input={data}/CameraRGB',
            f'--output={out}', f'--ensemble={t["tmp"]}/none'], [
        f'{t["tmp"]}/none/config.json does not exist']
  if name == 'predict: no checkpoint':
    shutil.rmtree(workdir / 'checkpoints')
    return ['unet_jax.predict', f'--workdir={workdir}', f'--input={data}/CameraRGB',
            f'--output={out}'], [f'{workdir} holds no checkpoint']
  if name == 'predict: missing input':
    return ['unet_jax.predict', f'--workdir={workdir}', f'--input={data}/none.png',
            f'--output={out}'], [f'--input {data}/none.png: no such file or folder']
  if name == 'predict: output holds the input':
    return ['unet_jax.predict', f'--workdir={workdir}', f'--input={data}/CameraRGB/000001.png',
            f'--output={data}'], [f'--output {data} contains the input']
  if name == 'synthetic: unwritable output':
    (t['tmp'] / 'a_file').write_text('x')
    return ['unet_jax.synthetic', f'--output={t["tmp"]}/a_file/scenes', '--num_scenes=2'], [
        f'{t["tmp"]}/a_file/scenes: cannot write scenes there']
  if name == 'synthetic: no scenes':
    return ['unet_jax.synthetic', f'--output={out}', '--num_scenes=0'], [
        'the number of scenes must be >= 1, got 0']
  raise AssertionError(name)


CASES = ['main: config choice', 'main: contradicting fields', 'main: infinite learning rate',
         'main: missing data folder', 'main: corrupt PNG', 'main: mask value out of range',
         'main: dangling link', 'main: unwritable workdir', 'main: damaged config.json',
         'evaluate: not a workdir', 'evaluate: unknown step', 'evaluate: corrupt checkpoint',
         'evaluate: bad folder', 'evaluate: unwritable report folder', 'evaluate: bad eval size',
         'evaluate: no class weights', 'evaluate: ensemble of another split',
         'predict: bad test-time scales', 'predict: missing ensemble member',
         'predict: negative prior correction', 'predict: no checkpoint',
         'predict: missing input', 'predict: output holds the input',
         'synthetic: unwritable output', 'synthetic: no scenes']


@pytest.mark.parametrize('name', CASES)
def test_a_bad_input_is_one_error_line_and_changes_nothing(trained, tmp_path, name):
  data, workdir = tmp_path / 'data', tmp_path / 'workdir'
  synthetic.write_scenes(data, 12, seed=1, size=(40, 56))
  shutil.copytree(trained['workdir'], workdir)
  folders = {'data': data, 'workdir': workdir, 'out': tmp_path / 'out', 'tmp': tmp_path,
             'new_workdir': tmp_path / 'new_run',
             'last_step': max(int(p.name) for p in (workdir / 'checkpoints').iterdir())}
  argv, expected = _case(name, folders)
  data_before = _snapshot(data)
  checkpoints_before = _snapshot(workdir / 'checkpoints')
  env = dict(os.environ, JAX_PLATFORMS='cpu', UNET_JAX_CACHE=str(tmp_path / 'cache'))
  result = subprocess.run([sys.executable, '-m', *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  output = result.stdout + result.stderr
  assert result.returncode == 1, output[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, output[-3000:]
  for part in expected:
    assert part in errors[0], errors[0]
  assert 'Traceback' not in output, output[-3000:]
  assert _snapshot(data) == data_before
  assert _snapshot(workdir / 'checkpoints') == checkpoints_before
  assert not (tmp_path / 'out').exists()
  if name in ('main: config choice', 'main: contradicting fields', 'main: infinite learning rate'):
    assert not folders['new_workdir'].exists()  # refused before anything is written


def test_a_derived_config_loads_from_any_directory(tmp_path):
  # carla_pretrained.py imports carla.py: from outside the repository (and under
  # the console script) that import must still resolve, so the run reaches the
  # config checks and stops on the bad field with one line.
  result = subprocess.run(
      [sys.executable, '-m', 'unet_jax.main',
       f'--config={REPO / "configs" / "carla_pretrained.py"}:smoke',
       f'--workdir={tmp_path / "run"}', '--config.lovasz_weight=-1'],
      cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS='cpu'),
      capture_output=True, text=True, timeout=120)
  output = result.stdout + result.stderr
  assert result.returncode == 1, output[-3000:]
  assert 'Traceback' not in output, output[-3000:]
  assert result.stderr.rstrip().splitlines()[-1] == (
      'error: invalid config: lovasz_weight must be a finite number >= 0, got -1.0')
  assert not (tmp_path / 'run').exists()


def test_the_traceback_is_shown_on_request(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'unet_jax.synthetic', f'--output={tmp_path}', '--num_scenes=0',
       '--verbosity=1'], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'),
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert 'Traceback' in result.stderr and 'UserError' in result.stderr
  assert result.stderr.rstrip().splitlines()[-1].startswith('error: the number of scenes')
