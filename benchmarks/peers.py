"""Strong simple peers for the quality benchmark: EASE and implicit ALS.

Both fit on the run's training events only and score users through the same
`evaluation.evaluate` call as the towers, so the candidate set (the whole
corpus), the mask (each EvalSet row's `seen` books) and the metrics are
identical. A user's known books are the EvalSet's `seen` row (every event
before the held-out ones), not the truncated `history` features.

- EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data",
  WWW 2019; the closed form is `tt_mimic.model.ease.fit`, which the
  exported blend uses too): a user's scores are x_u B, with the dense B
  here. NumPy only (SciPy, when installed, makes the inverse in place);
  float32; needs dense books x books matrices (books^2 * 4 bytes each, two
  at peak while tuning), hence the item cap.
- Implicit ALS (Hu, Koren & Volinsky, ICDM 2008) through the `implicit`
  library (the `bench` extra). Confidence is c = 1 + alpha on observed
  (user, book) pairs and 1 elsewhere, the form of the paper and of the
  former NumPy ALS (implicit multiplies the matrix by its own `alpha`, so
  the matrix holds 1 + alpha and the library's alpha stays 1). A user's
  factors are the training factors when the EvalSet's `seen` row is exactly
  the user's training books, else they are recomputed from `seen`
  (`recalculate_user`, the exact least-squares fold-in).

Each `tune_*` picks its setting on validation Recall@20 over the given grid
and returns the test metrics of that setting with `params` (the chosen
setting), `val` (its validation metrics), `grid` (every setting's
validation Recall@20) and `seconds` (fit + evaluation wall time).
"""

from __future__ import annotations

import itertools
import time
from typing import Callable, Sequence

from absl import logging
import numpy as np

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tt_mimic.config import TrainConfig
from tt_mimic.data import ingest
from tt_mimic.model import ease as ease_lib
from tt_mimic.training import blend as blend_lib
from tt_mimic.training import evaluation
from tt_mimic.training import pipeline

EASE_MAX_ITEMS = TrainConfig().ease_max_items  # the run flag's default
TUNE_METRIC = "recall@20"


REFIT_SPLITS = (ingest.SPLIT_TRAIN, ingest.SPLIT_VAL)


TooManyItemsError = ease_lib.TooManyItemsError


class _Rows:
  """Hands out the EvalSet rows of successive `evaluate` batches.

  `evaluate` scores `eval_set.dataset(batch_size)` in order; the batch only
  carries the features, so a peer tracks the row position and checks that
  the batch's features are those of the rows it is about to score. It wraps
  to the first row after the last one, so a scorer can be evaluated again.
  """

  def __init__(self, eval_set):
    self.eval_set = eval_set
    self.row = 0

  def next(self, batch: dict) -> slice:
    n = int(batch["user_id"].shape[0])
    if self.row >= len(self.eval_set):
      self.row = 0
    rows = slice(self.row, self.row + n)
    if (not np.array_equal(np.asarray(batch["user_id"]),
                           self.eval_set.user_id[rows])
        or not np.array_equal(np.asarray(batch["history"]),
                              self.eval_set.history[rows])):
      raise ValueError(
          "A peer scorer got a batch that is not the next rows of its "
          f"EvalSet (expected rows {rows.start}:{rows.stop}); score it with "
          "evaluation.evaluate(scorer, the same eval_set).")
    self.row += n
    return rows


def _padded(scores: np.ndarray) -> tf.Tensor:
  """[n, books] -> [n, books + 1] with the padding column 0 first."""
  out = np.zeros((scores.shape[0], scores.shape[1] + 1), np.float32)
  out[:, 1:] = scores
  return tf.constant(out)


def _tune(name: str, settings: Sequence[dict], fit: Callable[[dict], object],
          scorer: Callable[[object, object], Callable], prep,
          batch_size: int,
          refit: Callable[[dict], object] | None = None) -> dict:
  """Fits each setting, keeps the best on validation, scores it on test.

  With `refit` (the same fit on training plus validation events), the best
  setting is also refit so and scored on test, as `refit_test`: the peer's
  counterpart of the exported dat_refit.
  """
  if not settings:
    raise ValueError(f"{name}: the tuning grid is empty.")
  start = time.perf_counter()
  best, grid = None, []
  for params in settings:
    model = fit(params)
    val = evaluation.evaluate(scorer(model, prep.val), prep.val,
                              batch_size=batch_size)
    grid.append({**params, TUNE_METRIC: val[TUNE_METRIC]})
    logging.info("%s %s: val %s %.4f", name, params, TUNE_METRIC,
                 val[TUNE_METRIC])
    if best is None or val[TUNE_METRIC] > best[0][TUNE_METRIC]:
      best = (val, params, model)
    del model
  val, params, model = best
  # Test metrics with segments, as the towers' (pipeline.test_metrics).
  test = pipeline.test_metrics(scorer(model, prep.test), prep, batch_size)
  best = model = None  # free the tuned model before the refit
  if refit is not None:
    # Books segmented by the counts the refit saw, as dat_refit's are
    # (pipeline.refit_view).
    test["refit_test"] = pipeline.test_metrics(
        scorer(refit(params), prep.test), prep, batch_size,
        item_counts=pipeline.item_counts(prep.data.events,
                                         len(prep.data.items), REFIT_SPLITS))
  test.update(params=params, val=val, grid=grid,
              seconds=time.perf_counter() - start)
  for key, values in _grid_lists(settings).items():
    if len(values) > 1 and params[key] in (min(values), max(values)):
      logging.warning("%s: the best %s=%s is at the edge of the grid %s.",
                      name, key, params[key], values)
  return test


def _grid_lists(settings: Sequence[dict]) -> dict:
  return {key: sorted({s[key] for s in settings}) for key in settings[0]}


# ------------------------------------------------------------------ EASE


def ease_check_size(n_items: int, max_items: int = EASE_MAX_ITEMS) -> None:
  """Raises TooManyItemsError when EASE would exceed the item cap."""
  ease_lib.check_size(n_items, max_items, "--ease_max_items (or leave ease "
                      "out of --peers)")


ease_gram = ease_lib.gram
ease_weights = ease_lib.weights_from_gram


def ease_fit(users: np.ndarray, items: np.ndarray, n_items: int, lam: float,
             max_items: int = EASE_MAX_ITEMS) -> np.ndarray:
  """[books, books] float32 EASE weights from distinct 0-based pairs.

  Args:
    users, items: the training pairs.
    n_items: books in the corpus (columns of X).
    lam: the L2 weight lambda.
    max_items: refuse (TooManyItemsError) above this many books.
  """
  ease_check_size(n_items, max_items)
  return ease_lib.fit(users, items, n_items, lam)


def ease_scorer(weights: np.ndarray, eval_set) -> Callable[[dict], tf.Tensor]:
  """Scores x_u B for each EvalSet row, x_u = the row's `seen` books."""
  rows = _Rows(eval_set)

  def score(batch):
    out = np.empty((int(batch["user_id"].shape[0]), len(weights)),
                   np.float32)
    for i, row in enumerate(range(*rows.next(batch).indices(len(eval_set)))):
      seen = np.unique(np.asarray(eval_set.seen[row], np.int64)) - 1
      seen = seen[seen >= 0]
      out[i] = weights[seen].sum(axis=0) if seen.size else 0.0
    return _padded(out)
  return score


def tune_ease(prep, lambdas: Sequence[float], batch_size: int = 256,
              max_items: int = EASE_MAX_ITEMS) -> dict:
  """EASE tuned on validation Recall@20 over `lambdas`; test metrics."""
  n_items = len(prep.data.items)
  ease_check_size(n_items, max_items)
  users, items = blend_lib.fit_pairs(prep.data.events)
  settings = [{"lambda": float(lam)} for lam in lambdas]
  # The Gram matrix is rebuilt per lambda (cheap next to the inverse), so
  # the peak is two books x books matrices: the best so far and the new one.
  fit = lambda p: ease_fit(users, items, n_items, p["lambda"],  # noqa: E731
                           max_items)
  all_users, all_items = blend_lib.fit_pairs(prep.data.events, REFIT_SPLITS)
  refit = lambda p: ease_fit(all_users, all_items, n_items,  # noqa: E731
                             p["lambda"], max_items)
  return _tune("EASE", settings, fit, ease_scorer, prep, batch_size, refit)


# ------------------------------------------------------------------- ALS


def _csr(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int,
         value: float):
  from scipy import sparse  # pylint: disable=import-outside-toplevel
  return sparse.csr_matrix(
      (np.full(len(users), value, np.float32), (users, items)),
      shape=(n_users, n_items))


class AlsModel:
  """A fitted implicit ALS model and the training matrix it saw."""

  def __init__(self, model, train_matrix, confidence: float):
    self.model = model
    self.train_matrix = train_matrix  # [users, books] csr of `confidence`
    self.confidence = confidence  # 1 + alpha


def als_fit(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int,
            factors: int, alpha: float, reg: float, iterations: int,
            seed: int, threads: int = 0, use_cg: bool = True) -> AlsModel:
  """implicit's CPU ALS on distinct 0-based pairs, c = 1 + alpha.

  Args:
    threads: implicit's num_threads (0 = all cores); BLAS is held to one
      thread during the fit, as implicit asks.
    use_cg: implicit's conjugate-gradient solver (its default); False
      solves each least-squares problem exactly (Cholesky).
  """
  import threadpoolctl  # pylint: disable=import-outside-toplevel
  from implicit.cpu import als  # pylint: disable=import-outside-toplevel
  matrix = _csr(users, items, n_users, n_items, 1.0 + alpha)
  with threadpoolctl.threadpool_limits(1, "blas"):
    model = als.AlternatingLeastSquares(
        factors=int(factors), regularization=float(reg), alpha=1.0,
        iterations=int(iterations), use_cg=use_cg, num_threads=threads,
        random_state=int(seed))
    model.fit(matrix, show_progress=False)
  return AlsModel(model, matrix, 1.0 + alpha)


def als_user_factors(fitted: AlsModel, eval_set) -> np.ndarray:
  """[rows, factors]: training factors, or a fold-in from `seen`.

  A row keeps the user's training factors when its `seen` books are exactly
  the user's training books; otherwise (no training events, or `seen`
  holds more, e.g. validation events) the factors are recomputed from
  `seen` with `recalculate_user`.
  """
  import threadpoolctl  # pylint: disable=import-outside-toplevel
  model, train = fitted.model, fitted.train_matrix
  n_users, n_items = train.shape
  rows = np.repeat(np.arange(len(eval_set)),
                   [len(s) for s in eval_set.seen])
  cols = np.concatenate([np.zeros(0, np.int64)] + [
      np.asarray(s, np.int64) for s in eval_set.seen]) - 1
  keep = cols >= 0
  seen = _csr(rows[keep], cols[keep], len(eval_set), n_items, 1.0)
  seen.sum_duplicates()
  seen.data[:] = fitted.confidence
  user = np.asarray(eval_set.users, np.int64) - 1
  known = np.flatnonzero((user >= 0) & (user < n_users))
  out = np.zeros((len(eval_set), model.factors), np.float32)
  same = np.zeros(len(eval_set), bool)
  if known.size:
    out[known] = model.user_factors[user[known]]
    diff = (seen[known] != train[user[known]]).tocsr()
    same[known] = np.diff(diff.indptr) == 0
  fold = np.flatnonzero(~same)
  if fold.size:
    with threadpoolctl.threadpool_limits(1, "blas"):
      out[fold] = model.recalculate_user(fold, seen[fold])
  return out


def als_scorer(fitted: AlsModel, eval_set) -> Callable[[dict], tf.Tensor]:
  """Scores user factors . book factors for each EvalSet row, in order."""
  users = als_user_factors(fitted, eval_set)
  items = np.asarray(fitted.model.item_factors, np.float32)
  rows = _Rows(eval_set)

  def score(batch):
    return _padded(users[rows.next(batch)] @ items.T)
  return score


def tune_als(prep, factors: Sequence[int], alphas: Sequence[float],
             regs: Sequence[float], iterations: int, seed: int,
             batch_size: int = 256, threads: int = 0,
             use_cg: bool = True) -> dict:
  """implicit ALS tuned on validation Recall@20 over the grid; test metrics."""
  users, items = blend_lib.fit_pairs(prep.data.events)
  n_users, n_items = len(prep.data.users), len(prep.data.items)
  settings = [{"factors": int(f), "alpha": float(a), "reg": float(r),
               "iterations": int(iterations)}
              for f, a, r in itertools.product(factors, alphas, regs)]
  fit = lambda p: als_fit(  # noqa: E731
      users, items, n_users, n_items, p["factors"], p["alpha"], p["reg"],
      p["iterations"], seed, threads, use_cg)
  all_users, all_items = blend_lib.fit_pairs(prep.data.events, REFIT_SPLITS)
  refit = lambda p: als_fit(  # noqa: E731
      all_users, all_items, n_users, n_items, p["factors"], p["alpha"],
      p["reg"], p["iterations"], seed, threads, use_cg)
  return _tune("ALS", settings, fit, als_scorer, prep, batch_size, refit)
