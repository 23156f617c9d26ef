"""Segment metrics: popularity tiers and where a ranking hits."""

import numpy as np

import tt_mimic  # noqa: F401  (before TensorFlow)
from tt_mimic.data import pipeline as data_lib
from tt_mimic.training import evaluation


def test_popularity_tiers_split_the_events_in_thirds():
  # 100 events: book 1 holds half (head), book 2 the next 30% (torso:
  # before it, 50% of the events), the rest are tail; 0 is padding.
  tiers = evaluation.popularity_tiers(np.array([0, 50, 30, 10, 5, 5, 0]))
  assert tiers.tolist() == ["", "head", "torso", "tail", "tail", "tail",
                            "tail"]


def _eval_set(seen, targets):
  n = len(seen)
  return data_lib.EvalSet(users=np.arange(1, n + 1), user_id=np.arange(1, n + 1),
                          history=np.zeros((n, 2), np.int64),
                          targets=[np.array(t) for t in targets],
                          seen=[np.array(s) for s in seen],
                          skipped_no_history=0)


def test_segment_metrics_worked_example():
  counts = np.array([0, 50, 30, 10, 1, 0])  # books 1..5
  cats = np.array(["", "A", "A", "B", "B", ""], dtype=object)
  # User 1 (2 known books) hits its target 1 at rank 1; user 2 (7 known)
  # misses target 4 and hits target 5 at rank 2.
  eval_set = _eval_set(seen=[[2, 3], [1, 2, 3, 1, 2, 3, 1]],
                       targets=[[1], [4, 5]])
  ranked = np.array([[1, 4, 5], [3, 5, 2]])
  out = evaluation.segment_metrics(ranked, eval_set, counts, cats, k=2)
  assert out["user_activity"] == {
      "1-2": {"users": 1, "recall@2": 1.0, "ndcg@2": 1.0},
      "6-10": {"users": 1, "recall@2": 0.5,
               "ndcg@2": (1 / np.log2(3)) / (1 + 1 / np.log2(3))}}
  assert out["item_popularity"] == {
      "head": {"targets": 1, "recall@2": 1.0},
      "tail": {"targets": 2, "recall@2": 0.5}}
  assert out["cold_books"] == {"cold": {"targets": 2, "recall@2": 0.5},
                               "warm": {"targets": 1, "recall@2": 1.0}}
  assert out["category"] == {"(none)": {"targets": 1, "recall@2": 1.0},
                             "A": {"targets": 1, "recall@2": 1.0},
                             "B": {"targets": 1, "recall@2": 0.0}}


def test_a_query_of_several_vectors_scores_each_book_by_its_best():
  rng = np.random.default_rng(0)
  items = rng.normal(size=(7, 4)).astype(np.float32)
  single = rng.normal(size=(3, 4)).astype(np.float32)
  several = rng.normal(size=(3, 2, 4)).astype(np.float32)
  got = evaluation.embedding_scorer(lambda batch: batch, items)
  np.testing.assert_allclose(got(single), single @ items.T, rtol=1e-5)
  np.testing.assert_allclose(
      got(several), np.maximum(several[:, 0] @ items.T,
                               several[:, 1] @ items.T), rtol=1e-5)
