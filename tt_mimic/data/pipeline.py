"""tf.data pipelines over the ingested, integer-indexed events.

Training examples are positions in the time-sorted sequence of training
events. A batch of positions is turned into feature dicts with vectorized
gathers: `user_id`, `item` (the positive book) and `history` (most recent
first, 0 = padding): either the user's latest other training books, never
the event's own (`other`), or strictly causal ones, only events with a
smaller timestamp than the target event (`causal`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

import tt_mimic  # noqa: F401
import tensorflow as tf

from tt_mimic.data import ingest


@dataclasses.dataclass
class TrainSequence:
  """Training events sorted by (user, timestamp, item), as flat arrays.

  Attributes:
    user: [n] user index of each event.
    item: [n] corpus index of each event's book.
    start: [n] position of the user's first training event.
    end: [n] position one past the user's last event strictly earlier in
      time than this event (causal history = positions [start, end)).
    user_end: [n] position one past the user's last training event.
  """
  user: np.ndarray
  item: np.ndarray
  start: np.ndarray
  end: np.ndarray
  user_end: np.ndarray

  def __len__(self):
    return len(self.user)


def train_sequence(events: pd.DataFrame,
                   splits: tuple[int, ...] = (ingest.SPLIT_TRAIN,)
                   ) -> TrainSequence:
  """Builds the causal index arrays from ingest's sorted events of `splits`."""
  train = events[events["split"].isin(splits)]
  user = train["user"].to_numpy(np.int64)
  ts = train["timestamp"].to_numpy(np.int64)
  n = len(user)
  pos = np.arange(n)
  new_user = np.r_[True, user[1:] != user[:-1]]
  start = np.maximum.accumulate(np.where(new_user, pos, 0))
  new_time = new_user | np.r_[True, ts[1:] != ts[:-1]]
  end = np.maximum.accumulate(np.where(new_time, pos, 0))
  last = np.r_[user[1:] != user[:-1], True]
  user_end = np.minimum.accumulate(np.where(last, pos + 1, n)[::-1])[::-1]
  return TrainSequence(user=user, item=train["item"].to_numpy(np.int64),
                       start=start, end=end, user_end=user_end)


def gather_history(item: tf.Tensor, start: tf.Tensor, end: tf.Tensor,
                   length: int) -> tf.Tensor:
  """[batch, length] items at positions end-1, end-2, ... >= start, else 0."""
  offsets = end[:, None] - 1 - tf.range(length, dtype=end.dtype)[None, :]
  valid = offsets >= start[:, None]
  values = tf.gather(item, tf.maximum(offsets, 0))
  return tf.where(valid, values, tf.zeros_like(values))


def gather_other_history(item: tf.Tensor, position: tf.Tensor,
                         start: tf.Tensor, user_end: tf.Tensor,
                         length: int) -> tf.Tensor:
  """[batch, length] the user's latest items other than the one at
  `position` (positions user_end-1, user_end-2, ... >= start), else 0."""
  offsets = (user_end[:, None] - 1
             - tf.range(length + 1, dtype=user_end.dtype)[None, :])
  valid = (offsets >= start[:, None]) & (offsets != position[:, None])
  # Move the valid positions to the front, in order, and keep `length`.
  order = tf.argsort(tf.cast(tf.logical_not(valid), tf.int32), axis=1,
                     stable=True)[:, :length]
  offsets = tf.gather(offsets, order, batch_dims=1)
  valid = tf.gather(valid, order, batch_dims=1)
  values = tf.gather(item, tf.maximum(offsets, 0))
  return tf.where(valid, values, tf.zeros_like(values))


def user_weights(seq: TrainSequence, power: float) -> np.ndarray:
  """[n] each training event's weight: n_u^-power for its user's n_u
  training events, scaled so that the events' mean weight is 1 (the loss
  keeps its scale; at power 1 every user weighs the same in total)."""
  weight = (seq.user_end - seq.start).astype(np.float64) ** -power
  return weight / weight.mean()


def epoch_order(size: int, seed: int, epoch) -> tf.Tensor:
  """[size] the positions of epoch `epoch` in training order.

  A stateless permutation keyed by (seed, epoch): an epoch's order does not
  depend on how many epochs this process ran before it, so a run resumed
  at epoch e sees the batches an uninterrupted run sees there.
  """
  key = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
  return tf.random.experimental.stateless_shuffle(
      tf.range(size, dtype=tf.int64), seed=key)


def train_dataset(seq: TrainSequence, user_id_index: np.ndarray,
                  history_length: int, batch_size: int,
                  seed: int, history: str = "causal", epochs: int = 1,
                  first_epoch: int = 0,
                  user_weight_power: float = 0.0) -> tf.data.Dataset:
  """Shuffled, batched, prefetched feature dicts of training events.

  Args:
    seq: the training events.
    user_id_index: [num_users + 1] user-id embedding index per user index.
    history_length: history positions per example.
    batch_size: examples per batch.
    seed: shuffle seed; epoch e's order is `epoch_order(n, seed, e)`.
    history: "causal" (the user's events strictly earlier than the example)
      or "other" (the user's latest training events but the example's own:
      for data whose order carries no signal, such as a random split).
    epochs: one past the last epoch the dataset holds.
    first_epoch: the first epoch it holds (a resumed run's).
    user_weight_power: when positive, each example also has a `weight`:
      n^-power for a user with n training events, scaled to a mean of 1
      over the events (`user_weights`).

  Returns:
    The batches of epochs first_epoch, ..., epochs - 1 in one stream
    (`-(-len(seq) // batch_size)` batches per epoch, the last one partial).
  """
  if history not in ("causal", "other"):
    raise ValueError(f"history must be 'causal' or 'other', not {history!r}.")
  item = tf.constant(seq.item)
  user = tf.constant(user_id_index[seq.user])
  start, end = tf.constant(seq.start), tf.constant(seq.end)
  user_end = tf.constant(seq.user_end)
  size = len(seq)
  weight = (tf.constant(user_weights(seq, user_weight_power), tf.float32)
            if user_weight_power > 0 else None)

  def features(positions):
    if history == "causal":
      books = gather_history(item, tf.gather(start, positions),
                             tf.gather(end, positions), history_length)
    else:
      books = gather_other_history(item, positions, tf.gather(start, positions),
                                   tf.gather(user_end, positions),
                                   history_length)
    out = {"user_id": tf.gather(user, positions),
           "item": tf.gather(item, positions), "history": books}
    if weight is not None:
      out["weight"] = tf.gather(weight, positions)
    return out

  def one_epoch(epoch):
    return tf.data.Dataset.from_tensor_slices(
        epoch_order(size, seed, epoch)).batch(batch_size)

  ds = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch)
  ds = ds.map(features, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  # Under a multi-worker strategy each worker builds this same stream (same
  # seed) and keeps its part of every global batch (DATA sharding): the
  # workers together see each global batch once, as one machine would.
  # (FILE sharding does not apply: the input is in-memory arrays.)
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.DATA)
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


@dataclasses.dataclass
class EvalSet:
  """Users to evaluate on one split, with what the model may see.

  Attributes:
    users: [m] user indices.
    user_id: [m] user-id embedding index (0 for users unseen in training).
    history: [m, h] their most recent known books, most recent first.
    targets: list of m arrays of held-out corpus indices.
    seen: list of m arrays of the user's known books (masked).
    skipped_no_history: users of the split with no known event.
  """
  users: np.ndarray
  user_id: np.ndarray
  history: np.ndarray
  targets: list
  seen: list
  skipped_no_history: int

  def __len__(self):
    return len(self.users)

  def dataset(self, batch_size: int) -> tf.data.Dataset:
    """Batches of the users' features, and `seen` (ragged [batch, None]: every
    known book, which an item-item model such as EASE reads)."""
    lengths = np.fromiter((len(s) for s in self.seen), np.int64,
                          len(self.seen))
    books = (np.concatenate(self.seen).astype(np.int64) if len(self.seen)
             else np.zeros(0, np.int64))
    return tf.data.Dataset.from_tensor_slices(
        {"user_id": self.user_id, "history": self.history,
         "seen": tf.RaggedTensor.from_row_lengths(books, lengths)}
    ).batch(batch_size)


def eval_set(events: pd.DataFrame, split: int, user_id_index: np.ndarray,
             history_length: int, max_users: int = 0, seed: int = 0,
             known_splits: tuple[int, ...] = (ingest.SPLIT_TRAIN,)) -> EvalSet:
  """Held-out events of `split`, grouped per user.

  A user's features (history) and the books masked from the ranking come
  from the events of `known_splits`: the events a deployed model would know
  when the held-out ones happen (training only for validation; training and
  validation for test). Users of the split with no known event are skipped
  and counted (the model has nothing about them; popularity is their
  fallback).
  """
  train = events[events["split"].isin(known_splits)]
  held = events[events["split"] == split]
  train_user = train["user"].to_numpy(np.int64)  # sorted by ingest
  train_item = train["item"].to_numpy(np.int64)
  held_user = held["user"].to_numpy(np.int64)
  held_item = held["item"].to_numpy(np.int64)
  users = np.unique(held_user)
  lo = np.searchsorted(train_user, users, "left")
  hi = np.searchsorted(train_user, users, "right")
  has_history = hi > lo
  skipped = int((~has_history).sum())
  users, lo, hi = users[has_history], lo[has_history], hi[has_history]
  if max_users and len(users) > max_users:
    keep = np.sort(np.random.default_rng(seed).choice(
        len(users), max_users, replace=False))
    users, lo, hi = users[keep], lo[keep], hi[keep]
  held_lo = np.searchsorted(held_user, users, "left")
  held_hi = np.searchsorted(held_user, users, "right")
  history = np.zeros((len(users), history_length), np.int64)
  seen, targets = [], []
  for row in range(len(users)):
    items = train_item[lo[row]:hi[row]]
    recent = items[::-1][:history_length]
    history[row, :len(recent)] = recent
    seen.append(items)
    targets.append(held_item[held_lo[row]:held_hi[row]])
  return EvalSet(users=users, user_id=user_id_index[users], history=history,
                 targets=targets, seen=seen, skipped_no_history=skipped)
