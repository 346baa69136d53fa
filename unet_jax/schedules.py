"""Which examples each global batch holds: the order of a training epoch (a
pure function of (seed, epoch), optionally drawing frames that hold rare
classes more often), the donor frames of copy-paste, the padded evaluation
schedule, and each process's columns of every global batch."""

import numpy as np


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of one training epoch: a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_schedule(num_examples: int, batch_size: int, seed: int, epoch: int,
                   weights: np.ndarray | None = None) -> np.ndarray:
  """int64 [steps, batch]: example indices of every global batch (remainder dropped).

  Without weights each example once, in `epoch_order`; with weights [N] the
  same number of draws with replacement, example i with probability
  weights[i] / sum(weights). Either way a pure function of (seed, epoch).
  """
  steps = num_examples // batch_size
  if weights is None:
    order = epoch_order(num_examples, seed, epoch)
  else:
    weights = np.asarray(weights, np.float64)
    order = np.random.default_rng([seed, epoch]).choice(num_examples, size=num_examples,
                                                        p=weights / weights.sum())
  return order[:steps * batch_size].reshape(steps, batch_size)


def rare_content(frame_counts: np.ndarray, rare_classes) -> np.ndarray:
  """float64 [N]: each frame's rare-class content from its per-class pixel counts [N, C].

  Per rare class, the frame's pixels of that class over the class's mean per
  frame, averaged over the rare classes present in the split: 1 for a frame
  of average content, 0 for a frame with none (all 0 when none is present).
  Pixel shares rather than presence: at 640x480 poles occur in every CARLA
  frame.
  """
  counts = np.asarray(frame_counts, np.float64)[:, list(rare_classes)]
  mean = counts.mean(axis=0)
  present = mean > 0
  if not present.any():
    return np.zeros(len(counts))
  return (counts[:, present] / mean[present]).mean(axis=1)


def rare_frame_weights(frame_counts: np.ndarray, rare_classes, boost: float) -> np.ndarray:
  """float64 [N]: sampling weight 1 + boost * `rare_content` of each frame, so a
  frame of average rare content is drawn 1 + boost times as often as one with none."""
  return 1.0 + boost * rare_content(frame_counts, rare_classes)


def paste_donors(content: np.ndarray, num_slots: int, probability: float, seed: int,
                 epoch: int) -> np.ndarray:
  """int32 [num_slots, 2]: for slot k of the epoch, (donor, mirrored) for copy-paste.

  With `probability` a slot receives the rare-class pixels of a donor frame
  drawn in proportion to its `content` [N] (frames without rare pixels never
  donate), mirrored half the time; otherwise the donor is -1. A pure function
  of (seed, epoch) from its own stream (the trailing 2), so resumed runs paste
  the same objects.
  """
  content = np.asarray(content, np.float64)
  rng = np.random.default_rng([seed, epoch, 2])
  pasted = rng.random(num_slots) < probability
  mirrored = rng.random(num_slots) < 0.5
  if content.sum() <= 0:
    pasted[:] = False
    donors = np.zeros(num_slots, np.int64)
  else:
    donors = rng.choice(len(content), size=num_slots, p=content / content.sum())
  return np.stack([np.where(pasted, donors, -1), mirrored], axis=-1).astype(np.int32)


def eval_schedule(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices and validity [steps, batch]: every example once, the last batch padded."""
  steps = -(-num_examples // batch_size)
  positions = np.arange(steps * batch_size).reshape(steps, batch_size)
  valid = positions < num_examples
  return np.where(valid, positions, 0), valid


def process_columns(batch_size: int, process_index: int, process_count: int) -> slice:
  """This process's contiguous slice of every global batch."""
  if batch_size % process_count:
    raise ValueError(f'batch size {batch_size} is not divisible by {process_count} processes')
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)
