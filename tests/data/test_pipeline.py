"""Tests for tt_mimic.data.pipeline: causal training histories and
evaluation sets."""

import collections

import numpy as np
import pandas as pd
import pytest

import tt_mimic  # noqa: F401  (before TensorFlow)
import tensorflow as tf

from tt_mimic.data import pipeline as data
from tt_mimic.data import ingest

TRAIN, VAL, TEST = ingest.SPLIT_TRAIN, ingest.SPLIT_VAL, ingest.SPLIT_TEST


def _events(rows):
  """(user, item, timestamp, split) rows -> an ingest-style sorted frame."""
  frame = pd.DataFrame(rows, columns=["user", "item", "timestamp", "split"])
  frame = frame.astype({"user": np.int32, "item": np.int32,
                        "timestamp": np.int64, "split": np.int8})
  frame = frame.sort_values(["user", "timestamp", "item"], kind="stable")
  return frame.reset_index(drop=True)


def _brute_force_history(events, user, timestamp, length):
  """The user's training items strictly before `timestamp`, latest first."""
  train = events[(events["split"] == TRAIN) & (events["user"] == user)
                 & (events["timestamp"] < timestamp)]
  train = train.sort_values(["timestamp", "item"], ascending=False)
  items = train["item"].tolist()[:length]
  return items + [0] * (length - len(items))


def _user_id_index(events):
  """user index u -> embedding id u + 100 (0 stays 0), to see the lookup."""
  n = int(events["user"].max())
  return np.r_[0, np.arange(1, n + 1) + 100].astype(np.int64)


@pytest.fixture
def ingested(dataset_writer):
  """Ingest of a tiny dataset with many equal timestamps, leave-last-out."""
  ds = dataset_writer(n_users=10, n_items=8, events_per_user=6, seed=2,
                      ties=True)
  result = ingest.run(ds.config())
  ts = result.events.groupby("user")["timestamp"]
  assert (ts.nunique() < ts.size()).any(), "the data must hold equal times"
  return result


# Hand-made: user 1 has equal timestamps (items 2 and 3 at t=20), user 2 only
# equal timestamps, user 3 held-out events only, user 4 one train event.
HAND = _events([
    (1, 1, 10, TRAIN), (1, 3, 20, TRAIN), (1, 2, 20, TRAIN), (1, 5, 30, TRAIN),
    (1, 4, 40, VAL), (1, 6, 50, TEST),
    (2, 2, 5, TRAIN), (2, 6, 5, TRAIN), (2, 1, 60, TEST), (2, 3, 60, TEST),
    (3, 4, 70, TEST), (3, 2, 65, VAL),
    (4, 1, 1, TRAIN),
])


def test_train_sequence_hand_example():
  seq = data.train_sequence(HAND)
  # train rows in order: (1,1,10) (1,2,20) (1,3,20) (1,5,30) (2,2,5) (2,6,5)
  # (4,1,1)
  np.testing.assert_array_equal(seq.user, [1, 1, 1, 1, 2, 2, 4])
  np.testing.assert_array_equal(seq.item, [1, 2, 3, 5, 2, 6, 1])
  np.testing.assert_array_equal(seq.start, [0, 0, 0, 0, 4, 4, 6])
  # history = [start, end): items 2 and 3 (t=20) see only item 1; item 5
  # sees 1, 2, 3; user 2's two events share t=5 and see nothing.
  np.testing.assert_array_equal(seq.end, [0, 1, 1, 3, 4, 4, 6])
  assert len(seq) == 7
  history = data.gather_history(tf.constant(seq.item), tf.constant(seq.start),
                                tf.constant(seq.end), 3).numpy()
  np.testing.assert_array_equal(history, [
      [0, 0, 0], [1, 0, 0], [1, 0, 0], [3, 2, 1], [0, 0, 0], [0, 0, 0],
      [0, 0, 0]])


@pytest.mark.parametrize("length", [1, 3, 8])
def test_gather_history_is_strictly_causal(ingested, length):
  events = ingested.events
  train = events[events["split"] == TRAIN].reset_index(drop=True)
  seq = data.train_sequence(events)
  assert len(seq) == len(train)
  np.testing.assert_array_equal(seq.user, train["user"])
  np.testing.assert_array_equal(seq.item, train["item"])
  history = data.gather_history(tf.constant(seq.item), tf.constant(seq.start),
                                tf.constant(seq.end), length).numpy()
  assert history.shape == (len(train), length)
  for row in train.itertuples():
    expected = _brute_force_history(events, row.user, row.timestamp, length)
    assert history[row.Index].tolist() == expected, row
    # never the target, never anything at or after its time
    same_or_later = train[(train["user"] == row.user)
                          & (train["timestamp"] >= row.timestamp)]["item"]
    assert not set(history[row.Index]) & set(same_or_later)


def test_gather_history_on_arbitrary_positions():
  item = tf.constant([7, 8, 9, 4], tf.int64)
  start = tf.constant([0, 1, 3], tf.int64)
  end = tf.constant([3, 3, 3], tf.int64)
  # row 0: positions 2, 1, 0 -> 9, 8, 7; row 1: 2, 1 -> 9, 8; row 2: none
  np.testing.assert_array_equal(
      data.gather_history(item, start, end, 4).numpy(),
      [[9, 8, 7, 0], [9, 8, 0, 0], [0, 0, 0, 0]])


def _epoch(dataset):
  batches = list(dataset.as_numpy_iterator())
  return batches, {k: np.concatenate([b[k] for b in batches])
                   for k in ("user_id", "item", "history")}


def test_train_dataset_features_and_coverage(ingested):
  events = ingested.events
  seq = data.train_sequence(events)
  index = _user_id_index(events)
  ds = data.train_dataset(seq, index, history_length=4, batch_size=8, seed=1)
  spec = ds.element_spec
  assert set(spec) == {"user_id", "item", "history"}
  assert spec["user_id"].shape.as_list() == [None]
  assert spec["item"].shape.as_list() == [None]
  assert spec["history"].shape.as_list() == [None, 4]
  for key in spec:
    assert spec[key].dtype == tf.int64
  batches, flat = _epoch(ds)
  sizes = [len(b["item"]) for b in batches]
  assert sizes[:-1] == [8] * (len(sizes) - 1) and 0 < sizes[-1] <= 8
  for b in batches:
    assert b["history"].shape == (len(b["item"]), 4)
  # every training event exactly once per epoch
  train = events[events["split"] == TRAIN]
  expected = collections.Counter(zip(index[train["user"]].tolist(),
                                     train["item"].tolist()))
  got = collections.Counter(zip(flat["user_id"].tolist(),
                                flat["item"].tolist()))
  assert got == expected and sum(got.values()) == len(seq)
  # and each with its causal history
  when = {(u, i): t for u, i, t in zip(train["user"], train["item"],
                                      train["timestamp"])}
  for user_id, item, history in zip(flat["user_id"], flat["item"],
                                    flat["history"]):
    user = int(user_id) - 100
    expected = _brute_force_history(events, user, when[(user, int(item))], 4)
    assert history.tolist() == expected


def test_train_dataset_is_deterministic_under_a_seed(ingested):
  seq = data.train_sequence(ingested.events)
  index = _user_id_index(ingested.events)
  steps = -(-len(seq) // 5)

  def orders(seed, first_epoch=0):
    ds = data.train_dataset(seq, index, history_length=3, batch_size=5,
                            seed=seed, epochs=2, first_epoch=first_epoch)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == steps * (2 - first_epoch)
    return [{k: np.concatenate([b[k] for b in batches[i:i + steps]])
             for k in batches[0]} for i in range(0, len(batches), steps)]

  first, again, other = orders(7), orders(7), orders(8)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # each epoch is a reshuffle; another seed is another order
  assert first[0]["item"].tolist() != first[1]["item"].tolist() or (
      first[0]["user_id"].tolist() != first[1]["user_id"].tolist())
  assert list(zip(first[0]["user_id"], first[0]["item"])) != list(
      zip(other[0]["user_id"], other[0]["item"]))
  # A dataset that starts at epoch 1 (a resumed run) gives epoch 1's order.
  (resumed,) = orders(7, first_epoch=1)
  for key in resumed:
    np.testing.assert_array_equal(resumed[key], first[1][key])
  # but every epoch still covers the same examples
  assert sorted(zip(first[1]["user_id"], first[1]["item"])) == sorted(
      zip(first[0]["user_id"], first[0]["item"]))


def test_eval_set_hand_example():
  index = _user_id_index(HAND)
  test = data.eval_set(HAND, TEST, index, history_length=2)
  # user 3 has test events but no training event: skipped and counted
  np.testing.assert_array_equal(test.users, [1, 2])
  np.testing.assert_array_equal(test.user_id, [101, 102])
  assert test.skipped_no_history == 1
  assert len(test) == 2
  # most recent training books first; val/test books never in the history
  np.testing.assert_array_equal(test.history, [[5, 3], [6, 2]])
  assert [t.tolist() for t in test.targets] == [[6], [1, 3]]
  assert [s.tolist() for s in test.seen] == [[1, 2, 3, 5], [2, 6]]
  val = data.eval_set(HAND, VAL, index, history_length=5)
  np.testing.assert_array_equal(val.users, [1])
  assert val.skipped_no_history == 1  # user 3 again
  np.testing.assert_array_equal(val.history, [[5, 3, 2, 1, 0]])
  assert [t.tolist() for t in val.targets] == [[4]]
  batch = next(iter(val.dataset(batch_size=4)))
  assert set(batch) == {"user_id", "history", "seen"}
  np.testing.assert_array_equal(batch["history"].numpy(), val.history)
  assert batch["seen"].to_list() == [s.tolist() for s in val.seen]


def test_eval_set_uses_only_training_events(dataset_writer):
  ds = dataset_writer(n_users=20, n_items=10, events_per_user=4, seed=6,
                      ties=True)
  result = ingest.run(ds.config(split="temporal", val_fraction=0.2))
  events = result.events
  index = _user_id_index(events)
  for split in (VAL, TEST):
    held = events[events["split"] == split]
    train = events[events["split"] == TRAIN]
    ev = data.eval_set(events, split, index, history_length=3)
    has_train = held["user"].drop_duplicates().isin(train["user"])
    assert ev.skipped_no_history == int((~has_train).sum()) > 0
    assert len(ev) + ev.skipped_no_history == held["user"].nunique()
    for row, user in enumerate(ev.users):
      user_train = train[train["user"] == user]
      assert ev.seen[row].tolist() == user_train["item"].tolist()
      assert sorted(ev.targets[row].tolist()) == sorted(
          held.loc[held["user"] == user, "item"].tolist())
      recent = user_train["item"].tolist()[::-1][:3]
      assert ev.history[row].tolist() == recent + [0] * (3 - len(recent))
      assert ev.user_id[row] == index[user]


def test_eval_set_max_users_samples_deterministically(ingested):
  index = _user_id_index(ingested.events)
  full = data.eval_set(ingested.events, TEST, index, history_length=3)
  assert len(full) > 4
  a = data.eval_set(ingested.events, TEST, index, 3, max_users=4, seed=3)
  b = data.eval_set(ingested.events, TEST, index, 3, max_users=4, seed=3)
  assert len(a) == 4
  np.testing.assert_array_equal(a.users, b.users)
  assert set(a.users) <= set(full.users)
  assert list(a.users) == sorted(a.users)
  rows = {u: r for r, u in enumerate(full.users)}
  for r, u in enumerate(a.users):
    np.testing.assert_array_equal(a.history[r], full.history[rows[u]])
    np.testing.assert_array_equal(a.targets[r], full.targets[rows[u]])


def test_other_history_is_the_users_latest_other_books():
  events = pd.DataFrame({"user": [1, 1, 1, 2, 2, 3],
                         "item": [10, 11, 12, 20, 21, 30],
                         "timestamp": [1, 2, 2, 5, 6, 7],
                         "split": [ingest.SPLIT_TRAIN] * 6})
  seq = data.train_sequence(events)
  assert seq.user_end.tolist() == [3, 3, 3, 5, 5, 6]
  history = data.gather_other_history(
      tf.constant(seq.item), tf.range(6, dtype=tf.int64),
      tf.constant(seq.start), tf.constant(seq.user_end), 3).numpy()
  # Latest first, never the example's own book, never another user's.
  assert history.tolist() == [[12, 11, 0], [12, 10, 0], [11, 10, 0],
                              [21, 0, 0], [20, 0, 0], [0, 0, 0]]
  causal = data.gather_history(tf.constant(seq.item), tf.constant(seq.start),
                               tf.constant(seq.end), 3).numpy()
  assert causal.tolist()[:3] == [[0, 0, 0], [10, 0, 0], [10, 0, 0]]


def test_train_dataset_history_modes(tmp_path):
  events = pd.DataFrame({"user": [1, 1, 1], "item": [10, 11, 12],
                         "timestamp": [1, 2, 3],
                         "split": [ingest.SPLIT_TRAIN] * 3})
  seq = data.train_sequence(events)
  index = np.arange(2)
  other = next(iter(data.train_dataset(seq, index, 2, 3, 0, "other")))
  for item, hist in zip(other["item"].numpy(), other["history"].numpy()):
    assert item not in hist and (hist != 0).all()
  with pytest.raises(ValueError, match="'causal' or 'other'"):
    data.train_dataset(seq, index, 2, 3, 0, "random")


def test_user_weights():
  # Users with 1, 2 and 4 training events.
  events = pd.DataFrame({"user": [1, 2, 2, 3, 3, 3, 3],
                         "item": [10, 11, 12, 13, 14, 15, 16],
                         "timestamp": [1, 1, 2, 1, 2, 3, 4],
                         "split": [ingest.SPLIT_TRAIN] * 7})
  seq = data.train_sequence(events)
  whole = data.user_weights(seq, 1.0)
  assert whole.mean() == pytest.approx(1.0)
  # Every user weighs the same in total at power 1.
  totals = np.bincount(seq.user, weights=whole)[1:]
  np.testing.assert_allclose(totals, totals[0])
  half = data.user_weights(seq, 0.5)
  np.testing.assert_allclose(half[seq.user == 3] / half[seq.user == 1], 0.5)
  index = np.arange(4)
  plain = next(iter(data.train_dataset(seq, index, 2, 7, 0)))
  assert "weight" not in plain
  batch = next(iter(data.train_dataset(seq, index, 2, 7, 0,
                                       user_weight_power=1.0)))
  by_user = dict(zip(seq.user, whole))
  expected = [by_user[u] for u in batch["user_id"].numpy()]
  np.testing.assert_allclose(batch["weight"].numpy(), expected, rtol=1e-6)
