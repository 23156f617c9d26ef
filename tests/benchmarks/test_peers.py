"""Tests of benchmarks/peers.py: EASE against its closed form, the item cap,
and the ALS scorer's rows (skipped without the `bench` extra's implicit)."""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))), "benchmarks"))
import peers  # noqa: E402

from tt_mimic.data import ingest  # noqa: E402
from tt_mimic.data import pipeline as data_lib  # noqa: E402
from tt_mimic.training import evaluation  # noqa: E402

# 5 users x 4 books, 0-based (user, book) training pairs.
USERS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4])
ITEMS = np.array([0, 1, 2, 1, 3, 0, 2, 3, 2, 0, 1])
N_USERS, N_ITEMS = 5, 4


def closed_form(lam: float) -> np.ndarray:
  x = np.zeros((N_USERS, N_ITEMS))
  x[USERS, ITEMS] = 1.0
  p = np.linalg.inv(x.T @ x + lam * np.eye(N_ITEMS))
  b = np.eye(N_ITEMS) - p / np.diag(p)[None, :]
  np.fill_diagonal(b, 0.0)
  return b


def events(held: dict) -> pd.DataFrame:
  """Ingest-style events: USERS/ITEMS as training, `held` {user: [books]}
  as test (all 1-based corpus indices)."""
  rows = [(u + 1, i + 1, ingest.SPLIT_TRAIN) for u, i in zip(USERS, ITEMS)]
  rows += [(u, i, ingest.SPLIT_TEST) for u, books in held.items()
           for i in books]
  frame = pd.DataFrame(rows, columns=["user", "item", "split"])
  frame["timestamp"] = np.arange(len(frame))
  return frame.sort_values(["user", "timestamp"], kind="stable")


def make_eval_set(held: dict, history_length: int = 1):
  frame = events(held)
  user_id_index = np.arange(N_USERS + 1)
  return data_lib.eval_set(frame, ingest.SPLIT_TEST, user_id_index,
                           history_length)


def all_scores(scorer, eval_set) -> np.ndarray:
  return np.concatenate([np.asarray(scorer(batch))
                         for batch in eval_set.dataset(2)])


@pytest.mark.parametrize("scipy_lapack", [True, False])
def test_ease_equals_closed_form(scipy_lapack, monkeypatch):
  if not scipy_lapack:  # the NumPy-only inverse
    monkeypatch.setitem(sys.modules, "scipy.linalg", None)
  for lam in (0.5, 3.0):
    got = peers.ease_fit(USERS, ITEMS, N_ITEMS, lam)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, closed_form(lam), atol=1e-5)


def test_ease_gram_counts_co_reads():
  x = np.zeros((N_USERS, N_ITEMS))
  x[USERS, ITEMS] = 1.0
  np.testing.assert_array_equal(peers.ease_gram(USERS, ITEMS, N_ITEMS),
                                x.T @ x)


def test_ease_no_self_contribution_and_scores_all_seen_books():
  weights = peers.ease_fit(USERS, ITEMS, N_ITEMS, 1.0)
  np.testing.assert_array_equal(np.diag(weights), 0.0)
  # User 4 (1-based) read only book 3 (0-based 2); user 1 read 0, 1, 2 but
  # the history feature holds just the latest one: scores use all of seen.
  eval_set = make_eval_set({1: [4], 4: [1]}, history_length=1)
  assert [len(s) for s in eval_set.seen] == [3, 1]
  scores = all_scores(peers.ease_scorer(weights, eval_set), eval_set)
  assert scores.shape == (2, N_ITEMS + 1)
  np.testing.assert_array_equal(scores[:, 0], 0.0)
  np.testing.assert_allclose(scores[0, 1:], weights[[0, 1, 2]].sum(0),
                             rtol=1e-6)
  assert scores[1, 3] == 0.0  # its only book scores nothing for itself
  np.testing.assert_allclose(scores[1, 1:], weights[2], rtol=1e-6)


def test_ease_scorer_evaluates_twice_and_refuses_other_rows():
  weights = peers.ease_fit(USERS, ITEMS, N_ITEMS, 1.0)
  eval_set = make_eval_set({1: [4], 2: [1], 4: [1]})
  scorer = peers.ease_scorer(weights, eval_set)
  first = evaluation.evaluate(scorer, eval_set, batch_size=2)
  assert evaluation.evaluate(scorer, eval_set, batch_size=2) == first
  other = make_eval_set({2: [1], 4: [1]})
  with pytest.raises(ValueError, match="not the next rows"):
    peers.ease_scorer(weights, eval_set)(next(iter(other.dataset(2))))


def test_ease_refuses_above_item_cap():
  with pytest.raises(peers.TooManyItemsError,
                     match=r"refuses 4 books.*cap is 3 books.*ease_max_items"):
    peers.ease_fit(USERS, ITEMS, N_ITEMS, 1.0, max_items=3)
  peers.ease_check_size(N_ITEMS, max_items=N_ITEMS)  # at the cap: fine


def test_tune_ease_picks_from_grid_and_reports():
  frame = events({1: [4], 2: [1], 4: [1]})
  prep = types.SimpleNamespace(
      data=types.SimpleNamespace(events=frame, items=range(N_ITEMS),
                                 users=range(N_USERS)),
      val=make_eval_set({1: [4], 2: [1], 4: [1]}),
      test=make_eval_set({1: [4], 2: [1], 4: [1]}),
      item_counts=np.bincount(frame["item"], minlength=N_ITEMS + 1),
      item_categories=np.array([""] * (N_ITEMS + 1), dtype=object))
  result = peers.tune_ease(prep, [1.0, 10.0], batch_size=2)
  assert result["params"]["lambda"] in (1.0, 10.0)
  assert [g["lambda"] for g in result["grid"]] == [1.0, 10.0]
  assert result["users"] == 3 and 0.0 <= result["recall@20"] <= 1.0
  # The segments of the towers' test metrics, for the peer too.
  activity = result["segments"]["user_activity"]
  assert sum(b["users"] for b in activity.values()) == 3


def test_refit_segments_count_validation_events():
  # Book 4 (1-based) has 2 training events (cold) and 2 validation events:
  # warm for the refit, which fits on both, as dat_refit's segments say.
  frame = events({1: [4], 2: [1], 4: [1]})
  val = pd.DataFrame({"user": [2, 4], "item": [4, 4],
                      "split": ingest.SPLIT_VAL, "timestamp": [100, 101]})
  frame = pd.concat([frame, val], ignore_index=True)
  counts = np.bincount(frame[frame["split"] == ingest.SPLIT_TRAIN]["item"],
                       minlength=N_ITEMS + 1)
  prep = types.SimpleNamespace(
      data=types.SimpleNamespace(events=frame, items=range(N_ITEMS),
                                 users=range(N_USERS)),
      val=make_eval_set({1: [4], 2: [1], 4: [1]}),
      test=make_eval_set({1: [4], 2: [1], 4: [1]}),
      item_counts=counts,
      item_categories=np.array([""] * (N_ITEMS + 1), dtype=object))
  result = peers.tune_ease(prep, [1.0], batch_size=2)
  # Test targets: book 4 once, book 1 twice.
  assert result["segments"]["cold_books"]["cold"]["targets"] == 1
  refit = result["refit_test"]["segments"]["cold_books"]
  assert "cold" not in refit and refit["warm"]["targets"] == 3


def test_als_scorer_rows_follow_eval_set_order():
  pytest.importorskip("implicit")
  fitted = peers.als_fit(USERS, ITEMS, N_USERS, N_ITEMS, factors=3,
                         alpha=5.0, reg=0.1, iterations=3, seed=1, threads=1)
  user_factors = fitted.model.user_factors
  items = fitted.model.item_factors
  eval_set = make_eval_set({1: [4], 3: [2], 5: [3]})
  # Rows in a different order than user index, as a subsample may give.
  order = np.array([2, 0, 1])
  for name in ("users", "user_id", "history"):
    setattr(eval_set, name, getattr(eval_set, name)[order])
  eval_set.seen = [eval_set.seen[i] for i in order]
  eval_set.targets = [eval_set.targets[i] for i in order]
  # A seen book beyond the training ones: that row is folded in.
  eval_set.seen[1] = np.r_[eval_set.seen[1], 4]
  scores = all_scores(peers.als_scorer(fitted, eval_set), eval_set)
  assert scores.shape == (3, N_ITEMS + 1)
  np.testing.assert_array_equal(scores[:, 0], 0.0)
  np.testing.assert_allclose(scores[0, 1:], user_factors[4] @ items.T,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scores[2, 1:], user_factors[2] @ items.T,
                             rtol=1e-5, atol=1e-6)
  folded = fitted.model.recalculate_user(0, _row(fitted, [0, 1, 2, 3]))
  np.testing.assert_allclose(scores[1, 1:], folded @ items.T, rtol=1e-4,
                             atol=1e-6)


def test_als_is_deterministic_given_the_seed():
  pytest.importorskip("implicit")
  fit = lambda seed: peers.als_fit(  # noqa: E731
      USERS, ITEMS, N_USERS, N_ITEMS, factors=3, alpha=5.0, reg=0.1,
      iterations=3, seed=seed).model.item_factors
  np.testing.assert_array_equal(fit(7), fit(7))
  assert not np.array_equal(fit(7), fit(8))


def _row(fitted, books):
  from scipy import sparse  # pylint: disable=import-outside-toplevel
  return sparse.csr_matrix(
      (np.full(len(books), fitted.confidence, np.float32),
       (np.zeros(len(books), int), books)), shape=(1, N_ITEMS))
