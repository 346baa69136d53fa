"""Training: the state, the optimizer, the pure train step, and the loop.

`train_step(state, batch, dropout_key)` is a pure function, compiled once
with `jax.jit` over batches sharded along the 'data' axis of a mesh over
every device (`unet_jax.sharding`: parameters replicated, the state
donated). `train_and_evaluate(config, workdir)` is the loop around it, with
evaluations through `unet_jax.evaluation` (the same step `evaluate` uses) and
losses from `unet_jax.losses`. Inference code never imports this module.
"""

import functools
import signal
import time
from typing import Any

from absl import logging
import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from unet_jax import checkpointing
from unet_jax import classes
from unet_jax import config_checks
from unet_jax import errors
from unet_jax import evaluation
from unet_jax import input_pipeline
from unet_jax import losses
from unet_jax import metric_logging
from unet_jax import models
from unet_jax import pretrained
from unet_jax import prior_correction
from unet_jax import sharding


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  # With config.ema_decay > 0: the moving average of the model variables
  # ({'params', ['batch_stats']}), which evaluation, checkpoints' best step
  # and inference use; None otherwise.
  ema: Any = None


class NonFiniteLossError(errors.UserError, RuntimeError):
  """The loss or the state (parameters, statistics, optimizer moments) became inf or NaN."""


# --------------------------------------------------------------------------
# Optimizer.


def create_learning_rate_fn(config, steps_per_epoch: int) -> optax.Schedule:
  total_steps = max(1, int(config.num_epochs * steps_per_epoch))
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  if config.lr_schedule == 'constant':
    after_warmup = optax.constant_schedule(config.learning_rate)
  elif config.lr_schedule == 'cosine':
    after_warmup = optax.cosine_decay_schedule(config.learning_rate,
                                               max(1, total_steps - warmup_steps))
  else:
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {config.lr_schedule!r}")
  if not warmup_steps:
    return after_warmup
  warmup = optax.linear_schedule(0.0, config.learning_rate, warmup_steps)
  return optax.join_schedules([warmup, after_warmup], [warmup_steps])


def create_optimizer(config, learning_rate_fn) -> optax.GradientTransformation:
  """The config's optimizer; with `encoder_learning_rate_multiplier` != 1 the
  parameters under 'encoder' get their own copy at the scaled learning rate
  (optax.multi_transform), after clipping the global norm over all of them."""
  multiplier = config.get('encoder_learning_rate_multiplier', 1.0)
  if multiplier == 1.0:
    optimizer = _base_optimizer(config, learning_rate_fn)
  else:
    encoder_rate = lambda step: multiplier * learning_rate_fn(step)
    optimizer = optax.multi_transform(
        {'encoder': _base_optimizer(config, encoder_rate),
         'decoder': _base_optimizer(config, learning_rate_fn)},
        lambda params: {name: jax.tree.map(lambda _: 'encoder' if name == 'encoder'
                                           else 'decoder', subtree)
                        for name, subtree in params.items()})
  if config.grad_clip_norm:
    optimizer = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optimizer)
  return optimizer


def _base_optimizer(config, learning_rate_fn) -> optax.GradientTransformation:
  if config.optimizer == 'adam':
    optimizer = optax.adam(learning_rate_fn)
    if config.weight_decay:
      optimizer = optax.chain(optax.add_decayed_weights(config.weight_decay), optimizer)
  elif config.optimizer == 'adamw':
    optimizer = optax.adamw(learning_rate_fn, weight_decay=config.weight_decay)
  elif config.optimizer == 'sgd':
    optimizer = optax.chain(optax.add_decayed_weights(config.weight_decay),
                            optax.sgd(learning_rate_fn, momentum=config.momentum, nesterov=True))
  else:
    raise ValueError(f"optimizer must be 'adam', 'adamw' or 'sgd', got {config.optimizer!r}")
  return optimizer


# --------------------------------------------------------------------------
# State and steps.


def create_train_state(config, model: nn.Module, learning_rate_fn, key,
                       variables: dict | None = None) -> TrainState:
  """Fresh parameters (or `variables`) and optimizer state (on the default device)."""
  if variables is None:
    height, width = config.data.image_size
    variables = model.init(key, jnp.zeros((1, height, width, 3), jnp.float32), train=False)
  ema = None
  if config.get('ema_decay', 0.0):
    ema = {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           tx=create_optimizer(config, learning_rate_fn),
                           batch_stats=variables.get('batch_stats'), ema=ema)


def create_replicated_train_state(config, model, learning_rate_fn, key, mesh, *,
                                  load_pretrained: bool = True) -> TrainState:
  """The fresh state, created directly with its replicated sharding on `mesh`.

  With `model.pretrained` (and `load_pretrained`) the encoder's variables are
  the ImageNet weights (`unet_jax.pretrained`), read here on the host and
  placed on every device before the optimizer state is made from them.
  """
  if not (load_pretrained and config.model.get('pretrained', False)):
    create = functools.partial(create_train_state, config, model, learning_rate_fn)
    return jax.jit(create, out_shardings=sharding.replicated(mesh))(key)
  height, width = config.data.image_size
  init = lambda key: model.init(key, jnp.zeros((1, height, width, 3), jnp.float32), train=False)
  variables = jax.jit(init, out_shardings=sharding.replicated(mesh))(key)
  variant = models.encoder_variant(config.model)
  weights = pretrained.load_encoder_variables(variant=variant)
  # make_array_from_callback: every process places its own part of the replicated array.
  weights = jax.tree.map(lambda x: jax.make_array_from_callback(
      x.shape, sharding.replicated(mesh), lambda index: x[index]), weights)
  variables = pretrained.merge_encoder(variables, weights,
                                       source=str(pretrained.weights_path(variant)))
  return _state_from_variables(config, model, learning_rate_fn, mesh, variables)


def _state_from_variables(config, model, learning_rate_fn, mesh, variables) -> TrainState:
  """A fresh optimizer state around given (replicated) model variables, replicated."""
  create = functools.partial(create_train_state, config, model, learning_rate_fn, None)
  return jax.jit(lambda v: create(variables=v), out_shardings=sharding.replicated(mesh))(variables)


def create_state_from_run(config, model, learning_rate_fn, mesh) -> TrainState:
  """A fresh state whose model variables are those of `config.init_from`'s
  checkpoint `config.init_checkpoint` (see `checkpointing.restore_model`):
  step 0, a new optimizer state and, with `ema_decay`, an average starting
  from them."""
  _, variables, step = checkpointing.restore_model(
      config.init_from, str(config.init_checkpoint), sharding=sharding.replicated(mesh))
  logging.info('Starting from the model of %s at step %d (new optimizer and schedule).',
               config.init_from, step)
  return _state_from_variables(config, model, learning_rate_fn, mesh, variables)


def initial_keys(seed: int):
  """(parameter-initialisation key, dropout base key) for a seed.

  Initialisation uses XLA's RngBitGenerator: with threefry, compiling the
  U-Net's 26 initialisers takes about 20 s on a 2-core CPU against 2 s. It
  runs once, replicated. Dropout keeps threefry, whose bits do not depend on
  how the batch is sharded, so 1 and 8 devices train identically.
  """
  return jax.random.key(seed, impl='rbg'), jax.random.key(seed)


def model_variables(state: TrainState) -> dict:
  variables = {'params': state.params}
  if state.batch_stats is not None:
    variables['batch_stats'] = state.batch_stats
  return variables


def eval_variables(state: TrainState) -> dict:
  """The variables evaluation and checkpoints' best step use: the moving
  average when the run keeps one, else the current ones."""
  return state.ema if state.ema is not None else model_variables(state)


def ema_decay_at(step, decay: float):
  """The averaging decay at `step`: `decay`, or less early on,
  min(decay, (1 + step) / (10 + step)), so that the average soon forgets the
  initial weights whatever the length of the run."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema: dict, variables: dict, step, decay: float) -> dict:
  """ema <- d * ema + (1 - d) * variables, with d = ema_decay_at(step, decay)."""
  return optax.tree_utils.tree_update_moment(variables, ema, ema_decay_at(step, decay), 1)


def train_step(state: TrainState, batch: dict, dropout_key, *, ignore_label: int,
               class_weights, learning_rate_fn, lovasz_weight: float = 0.0,
               ema_decay: float = 0.0, hard_pixel_fraction: float = 1.0,
               deep_supervision: float = 0.0):
  """One optimisation step; returns the new state and summable metrics.

  The loss is the (class-weighted) cross-entropy, over the hardest
  hard_pixel_fraction of the pixels when that is < 1, plus lovasz_weight times
  the Lovasz-softmax loss when that is > 0, plus, when deep_supervision > 0,
  the class-weighted cross-entropy of each auxiliary classifier's logits
  (`models.AUX_STRIDES`, upsampled bilinearly to the labels' size) times
  deep_supervision at stride 2, halved at each coarser stride. With
  ema_decay > 0 the state's moving average of the variables follows the new
  ones (`update_ema`).
  """
  key = jax.random.fold_in(dropout_key, state.step)
  labels = batch['label']

  def loss_fn(params):
    variables = {'params': params}
    mutable = ['intermediates'] if deep_supervision else []
    if state.batch_stats is not None:
      variables['batch_stats'] = state.batch_stats
      mutable.append('batch_stats')
    logits, updates = state.apply_fn(variables, batch['image'], train=True,
                                     rngs={'dropout': key}, mutable=mutable)
    loss_sum, weight_sum = losses.segmentation_loss(logits, labels, valid=batch['valid'],
                                                    ignore_label=ignore_label,
                                                    class_weights=class_weights,
                                                    hard_fraction=hard_pixel_fraction)
    loss = loss_sum / jnp.maximum(weight_sum, 1e-12)
    if lovasz_weight:
      loss += lovasz_weight * losses.lovasz_softmax(logits, labels, valid=batch['valid'],
                                                    ignore_label=ignore_label)
    if deep_supervision:
      for i, stride in enumerate(models.AUX_STRIDES):
        aux, = updates['intermediates'][models.aux_logits_name(stride)]
        aux = jax.image.resize(aux, logits.shape, method='bilinear')
        aux_sum, aux_weight = losses.segmentation_loss(aux, labels, valid=batch['valid'],
                                                       ignore_label=ignore_label,
                                                       class_weights=class_weights)
        loss += deep_supervision * 0.5**i * aux_sum / jnp.maximum(aux_weight, 1e-12)
    return loss, (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads)
  if state.batch_stats is not None:
    new_state = new_state.replace(batch_stats=updates['batch_stats'])
  if state.ema is not None:
    new_state = new_state.replace(
        ema=update_ema(state.ema, model_variables(new_state), state.step, ema_decay))

  num_classes = logits.shape[-1]
  counted = (labels >= 0) & (labels < num_classes) & (labels != ignore_label)
  counted &= batch['valid'][:, None, None]
  correct = (jnp.argmax(logits, -1) == labels) & counted
  metrics = {
      'loss': loss,
      'correct_pixels': jnp.sum(correct, dtype=jnp.float32),
      'labelled_pixels': jnp.sum(counted, dtype=jnp.float32),
      'grad_norm': optax.global_norm(grads),
      'learning_rate': learning_rate_fn(state.step),
  }
  return new_state, metrics


def all_finite(tree) -> jax.Array:
  """One boolean: every floating-point leaf of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def checked_train_step(state: TrainState, batch: dict, dropout_key, **kwargs):
  """`train_step`, with metrics['state_finite']: the new parameters, batch-norm
  statistics, optimizer moments (and weight average) are all finite. Computed inside the step
  (a few reductions) and read only at the log steps that precede every save."""
  new_state, metrics = train_step(state, batch, dropout_key, **kwargs)
  metrics['state_finite'] = all_finite((new_state.params, new_state.batch_stats,
                                        new_state.opt_state, new_state.ema))
  return new_state, metrics


def record_class_weights(config, workdir: str, train_data=None) -> np.ndarray | None:
  """The loss's class weights (`config.class_weighting`) from the training
  split's pixel counts (None for 'none'), also written to the workdir for
  evaluate and predict's `--prior_correction` (unet_jax.prior_correction;
  ones for 'none'). Without train_data the training split is loaded from
  the config."""
  if train_data is None:
    train_data = input_pipeline.create_datasets(config, sharding.create_mesh())['train']
  weights = losses.class_weights_from_counts(
      train_data.class_pixel_counts(), config.class_weighting, config.class_weight_max)
  recorded = np.ones(config.model.num_classes) if weights is None else weights  # 'none'
  prior_correction.save(workdir, recorded, method=config.class_weighting,
                        cap=config.class_weight_max)
  return weights


def compile_train_step(config, mesh, learning_rate_fn, class_weights):
  step = functools.partial(checked_train_step, ignore_label=config.ignore_label,
                           class_weights=class_weights, learning_rate_fn=learning_rate_fn,
                           lovasz_weight=float(config.lovasz_weight),
                           ema_decay=float(config.get('ema_decay', 0.0)),
                           hard_pixel_fraction=float(config.get('hard_pixel_fraction', 1.0)),
                           deep_supervision=float(config.model.get('deep_supervision', 0.0)))
  replicated, batch = sharding.replicated(mesh), sharding.data_sharded(mesh)
  return jax.jit(step, in_shardings=(replicated, batch, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0)




# --------------------------------------------------------------------------
# The loop.


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _eval_scalars(split: str, summary: dict) -> dict:
  scalars = {f'{split}_{k}': summary[k]
             for k in ('loss', 'pixel_accuracy', 'mean_iou', 'mean_class_accuracy')}
  for index, iou in enumerate(summary['per_class_iou']):
    if not np.isnan(iou):
      scalars[f'{split}_iou/{classes.class_name(index)}'] = float(iou)
  return scalars


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None) -> dict:
  """Trains, evaluates every `eval_every_epochs`, checkpoints, resumes.

  Args:
    config: the run's hyper-parameters.
    workdir: where the config, checkpoints, logs and metrics go.
    stop_at_step: stop (with a checkpoint) once this global step is reached,
      as a preemption would; the next call on the workdir resumes.

  Returns:
    The last evaluation's summary (see `metrics.summarize`) plus 'step'.
  """
  config_checks.check_config(config, num_devices=jax.device_count())
  checkpointing.check_workdir(workdir)
  checkpointing.check_resumable(workdir, config)
  if config.init_from and not checkpointing.has_checkpoints(workdir):
    checkpointing.check_init_from(config)
  mesh = sharding.create_mesh()
  datasets = input_pipeline.create_datasets(config, mesh)
  train_data = datasets['train']
  eval_data = datasets[config.eval_split]
  if config.eval_split != 'train' and config.eval_split in train_data.splits:
    logging.warning('training on the %s split too (data.train_splits=%s): its figures are not '
                    'held out', config.eval_split, '+'.join(train_data.splits))
  steps_per_epoch = train_data.steps_per_epoch
  total_steps = int(config.num_epochs * steps_per_epoch)
  if steps_per_epoch == 0:
    raise errors.UserError(f'the training split has {train_data.num_examples} examples, fewer '
                           f'than one batch of {config.batch_size}')

  model = models.unet_from_config(config.model)
  learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch)
  init_key, _ = initial_keys(config.seed)
  checkpoints = checkpointing.create_manager(workdir, config)
  # A resumed run takes every array from its checkpoint: no pretrained weights
  # and no init_from model to read.
  fresh = checkpoints.latest_step() is None
  if fresh and config.init_from:
    state = create_state_from_run(config, model, learning_rate_fn, mesh)
  else:
    state = create_replicated_train_state(config, model, learning_rate_fn, init_key, mesh,
                                          load_pretrained=fresh)
  state = checkpointing.restore_or_keep(checkpoints, state, config, workdir)
  checkpointing.save_config(workdir, config)
  start_step = int(state.step)

  class_weights = record_class_weights(config, workdir, train_data)
  p_train_step = compile_train_step(config, mesh, learning_rate_fn, class_weights)
  p_eval_step = evaluation.compile_eval_step(config, mesh, model)
  # Made under jit: device_put cannot place a host value on other processes' devices.
  dropout_key = jax.jit(lambda: initial_keys(config.seed)[1],
                        out_shardings=sharding.replicated(mesh))()

  writer = metric_logging.MetricWriter(workdir, enabled=jax.process_index() == 0,
                                       resume_step=start_step)
  if start_step:
    logging.info('Resuming from step %d of %d.', start_step, total_steps)
  last_eval: dict = {}
  history: list[dict] = []
  step = start_step
  timer = (time.perf_counter(), step)
  try:
    with _StopRequest() as stop:
      for epoch in range(start_step // steps_per_epoch, int(config.num_epochs)):
        first = step - epoch * steps_per_epoch
        progress = metric_logging.Progress(f'epoch {epoch + 1}/{config.num_epochs}',
                                           total=steps_per_epoch, initial=first,
                                           enabled=jax.process_index() == 0)
        for batch in train_data.train_batches(epoch, first_step=first):
          state, step_metrics = p_train_step(state, batch, dropout_key)
          history.append(step_metrics)
          step += 1
          progress.update()
          stopping = _should_stop(stop, step, stop_at_step, config)
          # Log steps are the only host syncs. Checkpoint steps and epoch ends
          # are log steps too, so a non-finite loss is caught before any save.
          if (step % config.log_every_steps == 0 or step % config.checkpoint_every_steps == 0
              or step % steps_per_epoch == 0 or stopping):
            scalars = _log_train_metrics(writer, history, step, timer, config, steps_per_epoch,
                                         checkpoints.latest_step())
            progress.set_postfix(loss=scalars['train_loss'],
                                 acc=scalars['train_pixel_accuracy'])
            history, timer = [], (time.perf_counter(), step)
          if step % config.checkpoint_every_steps == 0 or stopping:
            checkpointing.save(checkpoints, step, state)
          if stopping:
            progress.close()
            at_limit = stop_at_step is not None and step >= stop_at_step
            reason = stop.signal_name or (f'stop_at_step={stop_at_step}' if at_limit
                                          else 'a signal to another process')
            logging.info('Stopped at step %d (%s); checkpoint saved.', step, reason)
            return {**last_eval, 'step': step, 'stopped': True}
        progress.close()

        end_of_epoch = epoch + 1
        if end_of_epoch % config.eval_every_epochs == 0 or end_of_epoch == config.num_epochs:
          last_eval = evaluation.evaluate(p_eval_step, eval_variables(state), eval_data)
          writer.write(step, {**_eval_scalars(config.eval_split, last_eval),
                              'epoch': end_of_epoch}, echo=False)
          checkpointing.save(checkpoints, step, state, mean_iou=last_eval['mean_iou'])
          logging.info('epoch %d: %s pixel accuracy %.4f, mean IoU %.4f', end_of_epoch,
                       config.eval_split, last_eval['pixel_accuracy'], last_eval['mean_iou'])

    if not last_eval:  # a finished run started again: nothing trained, report only
      last_eval = evaluation.evaluate(p_eval_step, eval_variables(state), eval_data)
    checkpointing.save(checkpoints, step, state, mean_iou=last_eval['mean_iou'])
  finally:
    # Whatever ends the run, the checkpoints already started are completed.
    checkpoints.wait_until_finished()
    writer.close()
  if jax.process_index() == 0:
    logging.info('Final %s metrics at step %d:\n%s', config.eval_split, step,
                 metric_logging.per_class_table(last_eval))
    logging.info('Checkpoints, metrics.jsonl and TensorBoard events (tensorboard --logdir %s) '
                 'are in %s', workdir, workdir)
  return {**last_eval, 'step': step}


def _log_train_metrics(writer, history, step, timer, config, steps_per_epoch,
                       latest_checkpoint) -> dict:
  """Summarises the steps since the last log step; raises on a non-finite loss."""
  history = jax.device_get(history)
  first_step = step - len(history) + 1
  for offset, step_metrics in enumerate(history):
    loss_finite = bool(np.isfinite(step_metrics['loss']))
    if not (loss_finite and step_metrics.get('state_finite', True)):
      what = ('the parameters, batch-norm statistics or optimizer moments became inf or NaN'
              if loss_finite else f'the training loss became {float(step_metrics["loss"])}')
      kept = (f'the latest checkpoint, step {latest_checkpoint}, holds only finite values and '
              'stays the latest' if latest_checkpoint is not None else 'no checkpoint was saved')
      raise NonFiniteLossError(
          f'{what} at step {first_step + offset} (lower config.learning_rate or set '
          f'config.grad_clip_norm); training stopped, and {kept}.')
  correct = sum(float(h['correct_pixels']) for h in history)
  labelled = sum(float(h['labelled_pixels']) for h in history)
  steps_per_second = (step - timer[1]) / max(time.perf_counter() - timer[0], 1e-9)
  scalars = {
      'train_loss': float(np.mean([h['loss'] for h in history])),
      'train_pixel_accuracy': correct / max(labelled, 1.0),
      'grad_norm': float(np.mean([h['grad_norm'] for h in history])),
      'learning_rate': float(history[-1]['learning_rate']),
      'steps_per_second': steps_per_second,
      'images_per_second': steps_per_second * config.batch_size,
      'epoch': step / steps_per_epoch,
  }
  writer.write(step, scalars)
  return scalars


def _should_stop(stop: _StopRequest, step: int, stop_at_step: int | None, config) -> bool:
  if stop_at_step is not None and step >= stop_at_step:
    return True
  if jax.process_count() == 1:
    return stop.signal_name is not None
  # Every process must take the same decision, so agree only at log steps.
  if step % config.log_every_steps:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.int32(stop.signal_name is not None))
  return bool(np.any(flags))
