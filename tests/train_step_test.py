"""The loss, the optimizer and the jitted train/eval steps on in-memory batches."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import carla
from unet_jax import config_checks
from unet_jax import evaluation
from unet_jax import losses
from unet_jax import models
from unet_jax import sharding
from unet_jax import train


def _tiny_config():
  config = carla.get_config('smoke')  # 32x32, base 4, depth 2, batch 4
  config.model.num_classes = 5
  config.model.dropout_rate = 0.0
  config.lr_schedule = 'constant'  # these tests count steps, not epochs
  config.warmup_epochs = 0.0
  return config


def _batch(config, seed=0, batch_size=None):
  rng = np.random.default_rng(seed)
  batch_size = batch_size or config.batch_size
  height, width = config.data.image_size
  labels = rng.integers(0, config.model.num_classes, size=(batch_size, height, width))
  # Images that tell the label, so the task is learnable.
  images = labels[..., None] / config.model.num_classes + 0.1 * rng.random((batch_size, height, width, 3))
  return {'image': jnp.asarray(images, jnp.float32), 'label': jnp.asarray(labels, jnp.int32),
          'valid': jnp.ones((batch_size,), bool)}


def test_learning_rate_schedule_warmup_then_cosine():
  config = _tiny_config()
  config.num_epochs, config.warmup_epochs, config.lr_schedule = 4, 1, 'cosine'
  schedule = train.create_learning_rate_fn(config, steps_per_epoch=10)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(config.learning_rate)
  assert float(schedule(25)) == pytest.approx(config.learning_rate * 0.5, rel=1e-5)
  assert float(schedule(40)) == pytest.approx(0.0, abs=1e-9)


def _setup(config):
  mesh = sharding.create_mesh()
  model = models.unet_from_config(config.model)
  lr = train.create_learning_rate_fn(config, 10)
  state = train.create_replicated_train_state(config, model, lr, train.initial_keys(0)[0], mesh)
  step = train.compile_train_step(config, mesh, lr, class_weights=None)
  return mesh, model, state, step


def test_training_on_one_batch_lowers_the_loss_and_counts_steps():
  config = _tiny_config()
  config.learning_rate = 1e-2
  config.model.base_filters = 8
  _, _, state, step = _setup(config)
  batch = _batch(config)
  history = []
  for _ in range(40):
    state, metrics = step(state, batch, jax.random.key(1))
    history.append(float(metrics['loss']))
  assert int(state.step) == 40
  assert history[-1] < 0.5 * history[0]
  # One compilation for every step: same shapes, shardings and dtypes each time.
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_mixed_precision_keeps_float32_state():
  config = _tiny_config()
  config.model.dtype = 'bfloat16'
  _, _, state, step = _setup(config)
  state, metrics = step(state, _batch(config), jax.random.key(1))
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  assert metrics['loss'].dtype == jnp.float32 and np.isfinite(float(metrics['loss']))


def test_eval_step_confusion_counts_only_valid_examples():
  config = _tiny_config()
  mesh, model, state, _ = _setup(config)
  eval_step = evaluation.compile_eval_step(config, mesh, model)
  batch = _batch(config)
  batch['valid'] = jnp.array([True, True, False, False])
  confusion, _, weight = eval_step(train.model_variables(state), batch)
  height, width = config.data.image_size
  assert int(np.sum(confusion)) == 2 * height * width == int(weight)
  logits = model.apply(train.model_variables(state), batch['image'][:2])
  predictions = np.asarray(jnp.argmax(logits, -1))
  labels = np.asarray(batch['label'][:2])
  assert np.trace(np.asarray(confusion)) == np.sum(predictions == labels)


def test_lovasz_weight_adds_the_lovasz_term_to_the_loss():
  config = _tiny_config()
  config.lovasz_weight = 0.5
  _, _, state, step = _setup(config)
  batch = _batch(config)
  variables = train.model_variables(state)
  logits, _ = state.apply_fn(variables, batch['image'], train=True, mutable=['batch_stats'])
  loss_sum, weight_sum = losses.segmentation_loss(logits, batch['label'])
  expected = loss_sum / weight_sum + 0.5 * losses.lovasz_softmax(logits, batch['label'])
  _, metrics = step(state, batch, jax.random.key(1))
  assert float(metrics['loss']) == pytest.approx(float(expected), rel=1e-5)
  assert float(metrics['loss']) > float(loss_sum / weight_sum) + 0.05


def test_hard_pixel_fraction_limits_the_cross_entropy_to_the_hardest_pixels():
  config = _tiny_config()
  config.hard_pixel_fraction = 0.25
  _, _, state, step = _setup(config)
  batch = _batch(config)
  logits, _ = state.apply_fn(train.model_variables(state), batch['image'], train=True,
                             mutable=['batch_stats'])
  hard = losses.segmentation_loss(logits, batch['label'], hard_fraction=0.25)
  everything = losses.segmentation_loss(logits, batch['label'])
  _, metrics = step(state, batch, jax.random.key(1))
  assert float(metrics['loss']) == pytest.approx(float(hard[0] / hard[1]), rel=1e-5)
  assert float(metrics['loss']) > float(everything[0] / everything[1]) + 0.01
  assert float(hard[1]) == pytest.approx(0.25 * batch['label'].size, rel=0.01)
  for bad in (0.0, 1.5):
    config.hard_pixel_fraction = bad
    with pytest.raises(config_checks.ConfigError,
                       match=r'hard_pixel_fraction must be a finite number'):
      config_checks.check_fields(config)


def _log_softmax_cross_entropy(logits, labels, weights):
  """Class-weighted cross-entropy averaged over the pixels' weights, in numpy."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_p, np.asarray(labels)[..., None], -1)[..., 0]
  pixel_weights = np.asarray(weights)[np.asarray(labels)]
  return float(-(picked * pixel_weights).sum() / pixel_weights.sum())


def test_deep_supervision_adds_each_coarser_cross_entropy_at_half_the_weight():
  from configs import carla_pretrained  # pylint: disable=g-import-not-at-top
  config = carla_pretrained.get_config('smoke')  # 64x64 frames, decoder 8 wide
  config.model.update(pretrained=False, num_classes=5, deep_supervision=0.4)
  config.data.image_size = (32, 64)
  config.update(lovasz_weight=0.0, lr_schedule='constant', warmup_epochs=0.0)
  class_weights = np.array([1.0, 2.0, 0.5, 3.0, 1.5], np.float32)
  mesh = sharding.create_mesh()
  model = models.unet_from_config(config.model)
  lr = train.create_learning_rate_fn(config, 10)
  state = train.create_replicated_train_state(config, model, lr, train.initial_keys(0)[0], mesh)
  step = train.compile_train_step(config, mesh, lr, class_weights=jnp.asarray(class_weights))
  batch = _batch(config)
  logits, sown = state.apply_fn(train.model_variables(state), batch['image'], train=True,
                                mutable=['batch_stats', 'intermediates'])
  # By hand: each stride's logits upsampled to 32x64, their cross-entropy
  # weighted 0.4 at stride 2, 0.2 at stride 4 and 0.1 at stride 8.
  expected = main = _log_softmax_cross_entropy(logits, batch['label'], class_weights)
  for stride, weight in zip((2, 4, 8), (0.4, 0.2, 0.1)):
    aux, = sown['intermediates'][models.aux_logits_name(stride)]
    assert aux.shape == (4, 32 // stride, 64 // stride, 5)
    upsampled = jax.image.resize(aux, (4, 32, 64, 5), method='bilinear')
    expected += weight * _log_softmax_cross_entropy(upsampled, batch['label'], class_weights)
  heads = {stride: np.asarray(state.params[models.aux_head_name(stride)]['kernel'])
           for stride in models.AUX_STRIDES}
  new_state, metrics = step(state, batch, jax.random.key(1))  # donates state
  assert float(metrics['loss']) == pytest.approx(expected, rel=1e-4)
  assert float(metrics['loss']) > main + 0.1
  # The heads learn: their gradients are not zero.
  for stride, kernel in heads.items():
    assert not np.allclose(new_state.params[models.aux_head_name(stride)]['kernel'], kernel)
  # The seed U-Net has no decoder heads to supervise.
  config = _tiny_config()
  config.model.deep_supervision = 0.5
  with pytest.raises(config_checks.ConfigError,
                     match='model.deep_supervision needs an EfficientNet encoder'):
    config_checks.check_config(config, num_devices=1)


def test_weight_average_follows_the_hand_computed_update():
  config = _tiny_config()
  config.ema_decay = 0.9
  config.learning_rate = 1e-2
  _, _, state, step = _setup(config)
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])
  variables = lambda s: flat(train.model_variables(s))
  np.testing.assert_array_equal(flat(state.ema), variables(state))  # starts at the weights
  ema = variables(state)
  for i in range(3):
    state, _ = step(state, _batch(config, seed=i), jax.random.key(1))
    decay = min(0.9, (1 + i) / (10 + i))  # 0.1, 0.18, 0.25: the early, lower decay
    ema = decay * ema + (1 - decay) * variables(state)
    np.testing.assert_allclose(flat(state.ema), ema, rtol=1e-5, atol=1e-7)
  assert not np.allclose(flat(state.ema), variables(state), atol=1e-4)
  assert float(train.ema_decay_at(10_000, 0.9)) == pytest.approx(0.9)


def test_without_weight_average_the_state_keeps_none():
  config = _tiny_config()
  _, _, state, step = _setup(config)
  state, _ = step(state, _batch(config), jax.random.key(1))
  assert state.ema is None
  assert train.eval_variables(state) is not None
