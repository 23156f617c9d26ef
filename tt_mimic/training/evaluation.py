"""Full-corpus ranking evaluation.

Every corpus book is scored for every evaluated user, the user's training
books are masked, and Recall, NDCG, HR, precision and MAP at K plus MRR
(over the top max(K)) are averaged over users. The held-out items are used
only to count hits; they never enter the candidate list, the features or
the mask. No sampled-candidate metric is computed (Krichene & Rendle,
"On Sampled Metrics for Item Recommendation", KDD 2020).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

import tt_mimic  # noqa: F401
import tensorflow as tf

from tt_mimic.data import pipeline as data_lib
from tt_mimic.progress import Progress

KS = (10, 20, 50, 100)


class DivergedError(RuntimeError):
  """Raised instead of reporting metrics of a model with non-finite output."""


def user_metrics(ranked: np.ndarray, targets: np.ndarray, ks=KS) -> dict:
  """Metrics of one user's ranked list.

  Args:
    ranked: [max_k] corpus indices, best first.
    targets: [t] held-out corpus indices (t >= 1).
    ks: cut-offs.

  Returns:
    {"recall@k", "ndcg@k", "hr@k", "precision@k", "map@k" for k in ks,
     "mrr"}.
  """
  hit = np.isin(ranked, targets)
  gains = hit / np.log2(np.arange(2, len(ranked) + 2))
  ideal = np.cumsum(1.0 / np.log2(np.arange(2, len(ranked) + 2)))
  precision_at = np.cumsum(hit) / np.arange(1, len(ranked) + 1)
  out = {}
  for k in ks:
    hits = hit[:k].sum()
    out[f"recall@{k}"] = hits / len(targets)
    out[f"ndcg@{k}"] = gains[:k].sum() / ideal[min(len(targets), k) - 1]
    out[f"hr@{k}"] = float(hits > 0)
    out[f"precision@{k}"] = hits / k
    out[f"map@{k}"] = ((precision_at[:k] * hit[:k]).sum()
                       / min(len(targets), k))
  first = np.flatnonzero(hit)
  out["mrr"] = 1.0 / (first[0] + 1) if first.size else 0.0
  return out


def mask_seen(scores: tf.Tensor, seen: list) -> tf.Tensor:
  """Sets scores of padding column 0 and each row's seen items to -inf."""
  rows = np.concatenate([np.full(len(s), r) for r, s in enumerate(seen)]
                        + [np.arange(len(seen))])
  cols = np.concatenate(list(seen) + [np.zeros(len(seen), np.int64)])
  indices = tf.constant(np.stack([rows, cols], 1), tf.int64)
  return tf.tensor_scatter_nd_update(
      scores, indices, tf.fill([len(rows)], -np.inf))


def evaluate(score_fn: Callable[[dict], tf.Tensor],
             eval_set: data_lib.EvalSet, ks=KS, batch_size: int = 256,
             return_ranked: bool = False):
  """Averages `user_metrics` over the users of `eval_set`.

  Args:
    score_fn: batch of {"user_id", "history"} -> [batch, num_items + 1]
      scores over the whole corpus (column 0 is padding).
    eval_set: users, their features, seen items and targets.
    ks: cut-offs.
    batch_size: users scored at once.
    return_ranked: also return the [users, max(ks)] ranked lists.

  Raises:
    DivergedError: when a score is NaN or infinite.
  """
  max_k = max(ks)
  totals, ranked_all = {}, []
  row = 0
  progress = Progress("evaluating", len(eval_set), "users")
  for batch in eval_set.dataset(batch_size):
    scores = tf.cast(score_fn(batch), tf.float32)
    if not bool(tf.reduce_all(tf.math.is_finite(scores))):
      raise DivergedError("The model produced non-finite scores; refusing to "
                          "report metrics of a diverged model.")
    n = int(scores.shape[0])
    scores = mask_seen(scores, eval_set.seen[row:row + n])
    k = min(max_k, int(scores.shape[1]) - 1)
    ranked = tf.math.top_k(scores, k=k).indices.numpy()
    for i in range(n):
      for name, value in user_metrics(ranked[i], eval_set.targets[row + i],
                                      ks).items():
        totals[name] = totals.get(name, 0.0) + value
    if return_ranked:
      ranked_all.append(ranked)
    row += n
    progress.add(n)
  progress.done()
  metrics = {name: total / max(row, 1) for name, total in totals.items()}
  metrics["users"] = row
  if return_ranked:
    return metrics, np.concatenate(ranked_all) if ranked_all else None
  return metrics


def popularity_scorer(train_count: np.ndarray) -> Callable[[dict], tf.Tensor]:
  """Scores every book by its training count (train_count[0] = padding)."""
  counts = tf.constant(train_count, tf.float32)

  def score(batch):
    n = tf.shape(batch["user_id"])[0]
    return tf.tile(counts[None, :], [n, 1])
  return score


def embedding_scorer(query_fn: Callable[[dict], tf.Tensor],
                     item_embeddings: tf.Tensor) -> Callable:
  """Scores by inner product of query embeddings with all item embeddings;
  a query of several vectors ([batch, k, d]) scores each item by its best."""
  items = tf.constant(item_embeddings)

  def score(batch):
    query = tf.convert_to_tensor(query_fn(batch))
    if query.shape.rank == 3:
      return tf.reduce_max(tf.einsum("bkd,nd->bkn", query, items), axis=1)
    return tf.matmul(query, items, transpose_b=True)
  return score


# ----------------------------------------------------------------- segments

ACTIVITY_BUCKETS = ((1, 2), (3, 5), (6, 10), (11, 20), (21, 50), (51, None))
COLD_MAX_COUNT = 2  # books with at most this many fitted events are cold


def _bucket_name(lo: int, hi: int | None) -> str:
  return f"{lo}+" if hi is None else f"{lo}-{hi}"


def popularity_tiers(item_counts: np.ndarray) -> np.ndarray:
  """[num_items + 1] tier of each book: 'head', 'torso' or 'tail'.

  Books sorted by fitted events; the head holds the most popular books that
  together make the first third of the events, the torso the next third,
  the tail the rest (books never seen included). Row 0 is padding.
  """
  counts = np.asarray(item_counts, np.float64)
  order = np.argsort(-counts[1:], kind="stable") + 1
  # Share of all events held by the books more popular than each book.
  before = (np.cumsum(counts[order]) - counts[order]) / max(counts.sum(), 1.0)
  tiers = np.full(len(counts), "tail", dtype=object)
  tiers[order[before < 2 / 3]] = "torso"
  tiers[order[before < 1 / 3]] = "head"
  tiers[0] = ""
  return tiers


def segment_metrics(ranked: np.ndarray, eval_set: data_lib.EvalSet,
                    item_counts: np.ndarray, item_categories: np.ndarray,
                    k: int = 20, top_categories: int = 10) -> dict:
  """Where a model hits: Recall and NDCG at k by segment.

  Args:
    ranked: [users, >= k] ranked corpus indices, as `evaluate` returns.
    eval_set: the users evaluated (their known books say how active they
      are) and their held-out books.
    item_counts: [num_items + 1] events each book was fitted on.
    item_categories: [num_items + 1] top-level category ('' = none).
    k: the cut-off.
    top_categories: categories with the most held-out books reported; the
      others are pooled as 'other'.

  Returns:
    {"user_activity": {bucket: {"users", "recall@k", "ndcg@k"}}, by the
     number of the user's known events; "item_popularity": {tier: {...}},
     "cold_books" and "category": {name: {...}}}: these three are per
     held-out book, {"targets", "recall@k"} = the share of held-out books of
     the segment found in the top k.
  """
  activity = np.array([len(s) for s in eval_set.seen])
  per_user = [user_metrics(ranked[i], eval_set.targets[i], (k,))
              for i in range(len(eval_set))]
  out = {"user_activity": {}}
  for lo, hi in ACTIVITY_BUCKETS:
    rows = np.flatnonzero((activity >= lo) & (activity <= (hi or np.inf)))
    if rows.size:
      out["user_activity"][_bucket_name(lo, hi)] = {
          "users": int(rows.size),
          f"recall@{k}": float(np.mean([per_user[r][f"recall@{k}"]
                                        for r in rows])),
          f"ndcg@{k}": float(np.mean([per_user[r][f"ndcg@{k}"]
                                      for r in rows]))}
  targets = np.concatenate(eval_set.targets) if len(eval_set) else np.zeros(
      0, np.int64)
  hits = np.concatenate([np.isin(t, ranked[i, :k])
                         for i, t in enumerate(eval_set.targets)]) if len(
                             eval_set) else np.zeros(0, bool)
  tiers = popularity_tiers(item_counts)[targets]
  counts = np.asarray(item_counts)[targets]
  cats = np.asarray(item_categories, dtype=object)[targets]
  cats = np.where(cats == "", "(none)", cats)
  ranked_cats = [c for c, _ in sorted(
      zip(*np.unique(cats, return_counts=True)), key=lambda x: (-x[1], x[0]))]
  keep = set(ranked_cats[:top_categories])
  cats = np.array([c if c in keep else "other" for c in cats], dtype=object)

  def by(labels, names):
    table = {}
    for name in names:
      mask = labels == name
      if mask.any():
        table[name] = {"targets": int(mask.sum()),
                       f"recall@{k}": float(hits[mask].mean())}
    return table

  out["item_popularity"] = by(tiers, ("head", "torso", "tail"))
  out["cold_books"] = by(np.where(counts <= COLD_MAX_COUNT, "cold", "warm"),
                         ("cold", "warm"))
  out["category"] = by(cats, ranked_cats[:top_categories] + ["other"])
  return out
