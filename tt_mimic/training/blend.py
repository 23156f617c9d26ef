"""The exported model blended with EASE (`model.ease`), fitted after the
towers.

On validation, with `dat` (fitted on training events) and EASE fitted on
the same events: EASE's lambda is chosen alone over `ease_lambdas`, then
the weight w over 0 and `ease_weights` (Recall@20; 0 is the towers alone,
and ties keep the smaller w). The exported towers are then blended with
EASE fitted on their own events (training plus validation for a refit) at
that lambda and w; their blend is the model `<exported>_ease`, which the
run exports when w > 0.

Each model's scale (s_t, s_e: the median over the first
`SCALE_USERS` validation users of each user's standard deviation of the
model's scores over the corpus) uses scores only, never a target, and the
validation users' features from training events, in both fits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import logging
import numpy as np

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tt_mimic.config import TrainConfig
from tt_mimic.data import ingest
from tt_mimic.model import ease as ease_lib
from tt_mimic.training import evaluation
from tt_mimic.training import pipeline

SCALE_USERS = 2048
TUNE_METRIC = "recall@20"


def fit_pairs(events, splits=(ingest.SPLIT_TRAIN,)
              ) -> tuple[np.ndarray, np.ndarray]:
  """Distinct 0-based (user, book) index pairs of the events of `splits`."""
  fit = events[events["split"].isin(splits)]
  users = fit["user"].to_numpy(np.int64) - 1
  items = fit["item"].to_numpy(np.int64) - 1
  n_items = int(items.max()) + 1 if items.size else 1
  keys = np.unique(users * n_items + items)
  return keys // n_items, keys % n_items


def ease_tables(prep: pipeline.Prepared, lam: float, top_k: int):
  """EASE fitted on the events `prep`'s models fit on, as `sparse_rows`."""
  users, items = fit_pairs(prep.data.events, prep.fit_splits)
  weights = ease_lib.fit(users, items, len(prep.data.items), lam)
  return ease_lib.sparse_rows(weights, top_k)


def score_spread(score_fn, eval_set, batch_size: int,
                 users: int = SCALE_USERS) -> float:
  """The median over the first `users` users of `eval_set` of each user's
  standard deviation of `score_fn`'s scores over the corpus (column 0, the
  padding book, left out)."""
  stds, seen = [], 0
  for batch in eval_set.dataset(batch_size):
    if seen >= users:
      break
    scores = tf.convert_to_tensor(score_fn(batch), tf.float32)[:, 1:]
    stds.append(tf.math.reduce_std(scores, axis=1).numpy())
    seen += len(stds[-1])
  spread = float(np.median(np.concatenate(stds)[:users])) if stds else 0.0
  if not spread > 0:
    raise ValueError("The blend needs scores that vary over the corpus; this "
                     "model's are constant for the median user.")
  return spread


class _Parts:
  """A towers model and EASE's tables, with their spreads on `eval_set`:
  `blend(w)` is their blend at weight w, and `scorer(w)` scores it (the
  corpus is embedded once for every w)."""

  def __init__(self, built, columns, values, eval_set, num_items, batch_size,
               info):
    self.built, self.columns, self.values = built, columns, values
    self.info, self.num_items = info, num_items
    self.embeddings = pipeline.item_embeddings(built.encoder, num_items)
    self.spread_towers = score_spread(
        pipeline.model_scorer(built, num_items, self.embeddings), eval_set,
        batch_size)
    self.spread_ease = score_spread(
        pipeline.ease_scorer(columns, values, num_items), eval_set,
        batch_size)

  def blend(self, w: float) -> pipeline.Built:
    return dataclasses.replace(self.built, blend=ease_lib.Blend(
        self.columns, self.values * np.float32(w / self.spread_ease),
        (1.0 - w) / self.spread_towers,
        {**self.info, "w": w, "spread_towers": self.spread_towers,
         "spread_ease": self.spread_ease}))

  def scorer(self, w: float):
    return pipeline.model_scorer(self.blend(w), self.num_items,
                                 self.embeddings)


def fit(prep: pipeline.Prepared, view: pipeline.Prepared,
        chooser: pipeline.Built, exported: pipeline.Built,
        train: TrainConfig) -> tuple[pipeline.Built | None, dict]:
  """`exported` (fitted on `view`'s events) blended with EASE, as chosen
  on validation with `chooser` (dat, fitted on `prep`'s training events).

  Returns:
    The blend (None when validation prefers the towers alone, w = 0) and
    what chose it: lambda, w and their validation grids.

  Raises:
    ease_lib.TooManyItemsError: the corpus is over `train.ease_max_items`.
  """
  n = len(prep.data.items)
  ease_lib.check_size(n, train.ease_max_items, "--ease_max_items")
  start = time.perf_counter()
  batch = train.eval_batch_size
  lambdas, best = [], None
  for lam in train.ease_lambdas:
    columns, values = ease_tables(prep, lam, train.ease_top_k)
    val = evaluation.evaluate(pipeline.ease_scorer(columns, values, n),
                              prep.val, batch_size=batch)[TUNE_METRIC]
    lambdas.append({"lambda": lam, TUNE_METRIC: val})
    logging.info("EASE lambda %g: validation %s %.4f", lam, TUNE_METRIC, val)
    if best is None or val > best[0]:
      best = (val, lam, columns, values)
  _, lam, columns, values = best
  parts = _Parts(chooser, columns, values, prep.val, n, batch, {})
  weights, chosen = [], None
  for w in sorted({0.0, *train.ease_weights}):
    val = evaluation.evaluate(parts.scorer(w), prep.val,
                              batch_size=batch)[TUNE_METRIC]
    weights.append({"w": w, TUNE_METRIC: val})
    logging.info("Towers + EASE at w %g: validation %s %.4f", w, TUNE_METRIC,
                 val)
    if chosen is None or val > chosen[0]:
      chosen = (val, w)
  info = {"lambda": lam, "top_k": train.ease_top_k, "lambdas": lambdas,
          "weights": weights, "w": chosen[1], "val_" + TUNE_METRIC: chosen[0]}
  if chosen[1] == max(train.ease_weights) < 1.0:
    logging.warning("The blend's w = %g is the largest of --ease_weights; a "
                    "larger one may score higher on validation.", chosen[1])
  if chosen[1] == 0.0:
    logging.info("Validation prefers the towers alone to any blend with "
                 "EASE: the run exports the towers.")
    return None, info
  if view.fit_splits != prep.fit_splits:
    columns, values = ease_tables(view, lam, train.ease_top_k)
  out = _Parts(exported, columns, values, view.val, n, batch, info).blend(
      chosen[1])
  out.blend.info["seconds"] = round(time.perf_counter() - start, 1)
  return out, out.blend.info


def save(blend: ease_lib.Blend | None, info: dict, model_dir: str,
         name: str) -> None:
  """Writes the blend `name` (`<exported>_ease`) to its variant directory:
  its info, and its tables unless validation chose the towers alone."""
  directory = os.path.join(model_dir, "variants", name)
  os.makedirs(directory, exist_ok=True)
  if blend is not None:
    blend.save(os.path.join(directory, pipeline.BLEND_TABLES))
  with open(os.path.join(directory, pipeline.BLEND_INFO), "w") as f:
    json.dump(info, f, indent=1)
