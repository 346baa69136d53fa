"""Starting a run from another run's model (config.init_from): a fine-tune."""

import shutil

import jax
import numpy as np
import pytest

from conftest import override, saved_params, trained_config
from unet_jax import checkpointing
from unet_jax import config_checks
from unet_jax import models
from unet_jax import sharding
from unet_jax import train


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def _fine_tune_config(trained, **overrides):
  """The trained model's config at 48x48 frames (it trained at 32x32), from its last checkpoint."""
  values = {'data.image_size': (48, 48), 'init_from': str(trained['workdir']),
            'num_epochs': 1, 'log_every_steps': 1, **overrides}
  return override(trained_config(trained['data_dir']), values)


def test_the_state_starts_from_the_other_runs_weights_with_a_new_optimizer(trained):
  config = _fine_tune_config(trained)
  _, source, source_step = checkpointing.restore_model(str(trained['workdir']), 'latest')
  assert source_step > 0
  mesh = sharding.create_mesh()
  model = models.unet_from_config(config.model)
  state = train.create_state_from_run(config, model, train.create_learning_rate_fn(config, 3),
                                      mesh)
  assert int(state.step) == 0
  np.testing.assert_array_equal(_flat(state.params), _flat(source['params']))
  np.testing.assert_array_equal(_flat(state.batch_stats), _flat(source['batch_stats']))
  # Adam's moments start at zero, as in a fresh run; the source's are not zero.
  fresh = train.create_train_state(config, model, train.create_learning_rate_fn(config, 3),
                                   jax.random.key(0))
  np.testing.assert_array_equal(_flat(state.opt_state), _flat(fresh.opt_state))
  # init_checkpoint picks an earlier step: other weights.
  steps = checkpointing.create_manager(str(trained['workdir']), config, read_only=True).all_steps()
  earlier = override(_fine_tune_config(trained), {'init_checkpoint': str(min(steps))})
  assert min(steps) < source_step
  state = train.create_state_from_run(earlier, model, train.create_learning_rate_fn(config, 3),
                                      mesh)
  assert not np.array_equal(_flat(state.params), _flat(source['params']))


def test_a_fine_tune_trains_at_its_own_size_and_resumes_from_its_own_checkpoints(
    trained, tmp_path):
  source = tmp_path / 'source'
  shutil.copytree(trained['workdir'], source)
  config = _fine_tune_config(trained, init_from=str(source), num_epochs=2)
  result = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  assert result['confusion_matrix'].sum() % (48 * 48) == 0  # evaluated at its own 48x48
  saved = checkpointing.load_config(str(tmp_path / 'straight'))
  assert saved.init_from == str(source) and tuple(saved.data.image_size) == (48, 48)
  # It trained from the source's weights: it ends nearer to them than a fresh run does.
  fresh = override(trained_config(trained['data_dir']), {'data.image_size': (48, 48),
                                                          'num_epochs': 2})
  train.train_and_evaluate(fresh, str(tmp_path / 'fresh'))
  start = saved_params(source)[1]
  assert (np.abs(saved_params(tmp_path / 'straight')[1] - start).mean()
          < np.abs(saved_params(tmp_path / 'fresh')[1] - start).mean())

  # Stopped, then resumed with the source gone: the run reads its own checkpoints.
  train.train_and_evaluate(config, str(tmp_path / 'resumed'), stop_at_step=2)
  shutil.rmtree(source)
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  step_a, params_a = saved_params(tmp_path / 'straight')
  step_b, params_b = saved_params(tmp_path / 'resumed')
  assert step_a == step_b
  np.testing.assert_allclose(params_b, params_a, rtol=0, atol=1e-6)


@pytest.mark.parametrize('change, message', [
    ({'model.base_filters': 8}, r'holds a different model.*model\.base_filters: checkpoint 4, '
                                r'config 8'),
    ({'init_from': '{tmp}/nowhere'}, r'config\.init_from: .*nowhere/config\.json does not exist'),
    ({'init_from': '{tmp}/empty'}, r'config\.init_from: .*empty holds no checkpoint'),
])
def test_a_source_that_does_not_fit_is_refused_before_anything_is_written(
    trained, tmp_path, change, message):
  (tmp_path / 'empty').mkdir()
  checkpointing.save_config(str(tmp_path / 'empty'), trained_config(trained['data_dir']))
  change = {k: (v.format(tmp=tmp_path) if isinstance(v, str) else v) for k, v in change.items()}
  config = _fine_tune_config(trained, **change)
  with pytest.raises(checkpointing.WorkdirError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()
  assert not (tmp_path / 'run' / 'config.json').exists()


@pytest.mark.parametrize('value', ['best', 'latest', '120'])
def test_init_checkpoint_accepts_best_latest_or_a_step(trained, value):
  config_checks.check_fields(_fine_tune_config(trained, init_checkpoint=value))


@pytest.mark.parametrize('value', ['last', '', '-1', '1.5'])
def test_init_checkpoint_refuses_anything_else(trained, value):
  with pytest.raises(config_checks.ConfigError, match='init_checkpoint must be'):
    config_checks.check_fields(_fine_tune_config(trained, init_checkpoint=value))


def test_the_console_names_the_source(trained):
  from unet_jax import main  # pylint: disable=g-import-not-at-top
  source = str(trained['workdir'])
  assert main.config_summary(_fine_tune_config(trained)).endswith(
      f'; starting from the model of {source}')
  assert 'starting from' not in main.config_summary(trained_config(trained['data_dir']))
