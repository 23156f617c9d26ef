"""The exported model blended with EASE (`model.ease`), fitted after the
towers.

On validation, with `dat` (fitted on training events) and EASE fitted on
the same events: EASE's lambda is chosen alone over `ease_lambdas`, then
the weight w and the popularity power beta together (Recall@20): the
towers alone (w = 0), then every w of `ease_weights` at every beta of
`ease_popularity_powers` (`ease.popularity_scaled`); ties keep the towers,
then the smaller beta, then the smaller w. The exported towers are then
blended with EASE fitted on their own events (training plus validation for
a refit, whose counts also divide its scores) at that lambda, w and beta;
their blend is the model `<exported>_ease`, which the run exports when
w > 0. EASE is exact up to `ease_max_items` books and fitted on each
book's `ease_neighbours` most co-read books above it
(`ease.neighbourhood_rows`).

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
from typing import Iterator, Sequence

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


def ease_tables(prep: pipeline.Prepared, lams: Sequence[float], top_k: int,
                neighbours: int = 0
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """EASE fitted on the events `prep`'s models fit on, as `sparse_rows`, at
  each of `lams` in turn: exact (0 `neighbours`; one fit per lambda, each
  on demand) or on each book's `neighbours` most co-occurring books
  (`ease.neighbourhood_rows`, which fits every lambda at once)."""
  users, items = fit_pairs(prep.data.events, prep.fit_splits)
  n = len(prep.data.items)
  if neighbours:
    yield from ease_lib.neighbourhood_rows(users, items, n, lams, neighbours,
                                           top_k)
    return
  for lam in lams:
    yield ease_lib.sparse_rows(ease_lib.fit(users, items, n, lam), top_k)


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


@dataclasses.dataclass(frozen=True)
class _Ease:
  """EASE's tables (values scaled by `popularity_scaled`) and their spread."""
  columns: np.ndarray
  values: np.ndarray
  power: float
  spread: float


class _Parts:
  """A towers model and its spread on `eval_set`, with which EASE's tables
  are blended: `blend(ease, w)` is their blend at weight w, and
  `scorer(ease, w)` scores it (the corpus is embedded once for all)."""

  def __init__(self, built, eval_set, num_items, batch_size, info):
    self.built, self.eval_set, self.info = built, eval_set, info
    self.num_items, self.batch_size = num_items, batch_size
    self.embeddings = pipeline.item_embeddings(built.encoder, num_items)
    self.towers = pipeline.model_scorer(built, num_items, self.embeddings)
    self.spread_towers = score_spread(self.towers, eval_set, batch_size)

  def ease(self, columns, values, counts, power: float) -> _Ease:
    """EASE's tables divided by the books' `counts` to the `power`."""
    values = ease_lib.popularity_scaled(columns, values, counts, power)
    return _Ease(columns, values, power, score_spread(
        pipeline.ease_scorer(columns, values, self.num_items),
        self.eval_set, self.batch_size))

  def blend(self, ease: _Ease, w: float) -> pipeline.Built:
    return dataclasses.replace(self.built, blend=ease_lib.Blend(
        ease.columns, ease.values * np.float32(w / ease.spread),
        (1.0 - w) / self.spread_towers,
        {**self.info, "w": w, "popularity_power": ease.power,
         "spread_towers": self.spread_towers, "spread_ease": ease.spread}))

  def scorer(self, ease: _Ease, w: float):
    return pipeline.model_scorer(self.blend(ease, w), self.num_items,
                                 self.embeddings)


def fit(prep: pipeline.Prepared, view: pipeline.Prepared,
        chooser: pipeline.Built, exported: pipeline.Built,
        train: TrainConfig) -> tuple[pipeline.Built | None, dict]:
  """`exported` (fitted on `view`'s events) blended with EASE, as chosen
  on validation with `chooser` (dat, fitted on `prep`'s training events).

  Returns:
    The blend (None when validation prefers the towers alone, w = 0) and
    what chose it: lambda, w, the popularity power and their validation
    grids.

  Raises:
    ease_lib.TooManyItemsError: the corpus is over `train.ease_max_items`
      and `train.ease_neighbours` is 0.
  """
  n = len(prep.data.items)
  # Exact EASE up to the cap, neighbourhoods above it.
  neighbours = train.ease_neighbours if n > train.ease_max_items else 0
  if not neighbours:
    ease_lib.check_size(n, train.ease_max_items, "--ease_max_items (or set "
                        "--ease_neighbours)")
  start = time.perf_counter()
  batch = train.eval_batch_size
  lambdas, best = [], None
  for lam, (columns, values) in zip(
      train.ease_lambdas,
      ease_tables(prep, train.ease_lambdas, train.ease_top_k, neighbours)):
    val = evaluation.evaluate(pipeline.ease_scorer(columns, values, n),
                              prep.val, batch_size=batch)[TUNE_METRIC]
    lambdas.append({"lambda": lam, TUNE_METRIC: val})
    logging.info("EASE lambda %g: validation %s %.4f", lam, TUNE_METRIC, val)
    if best is None or val > best[0]:
      best = (val, lam, columns, values)
  _, lam, columns, values = best
  parts = _Parts(chooser, prep.val, n, batch, {})
  towers = evaluation.evaluate(parts.towers, prep.val,
                               batch_size=batch)[TUNE_METRIC]
  weights = [{"w": 0.0, "popularity_power": 0.0, TUNE_METRIC: towers}]
  chosen = (towers, 0.0, 0.0)
  logging.info("The towers alone: validation %s %.4f", TUNE_METRIC, towers)
  for power in sorted(set(train.ease_popularity_powers)):
    ease = parts.ease(columns, values, prep.item_counts, power)
    for w in sorted(set(train.ease_weights) - {0.0}):
      val = evaluation.evaluate(parts.scorer(ease, w), prep.val,
                                batch_size=batch)[TUNE_METRIC]
      weights.append({"w": w, "popularity_power": power, TUNE_METRIC: val})
      logging.info("Towers + EASE at w %g, popularity power %g: validation "
                   "%s %.4f", w, power, TUNE_METRIC, val)
      if val > chosen[0]:
        chosen = (val, w, power)
  info = {"lambda": lam, "top_k": train.ease_top_k,
          "neighbours": neighbours, "lambdas": lambdas,
          "weights": weights, "w": chosen[1],
          "popularity_power": chosen[2], "val_" + TUNE_METRIC: chosen[0]}
  # A choice at its grid's top may want a larger grid, unless it is the
  # setting's own upper bound.
  uppers = {f.name: f.metadata["upper"]
            for f in dataclasses.fields(TrainConfig)}
  for name, value in (("ease_weights", chosen[1]),
                      ("ease_popularity_powers", chosen[2])):
    if 0 < value == max(getattr(train, name)) < uppers[name]:
      logging.warning("The blend's %s = %g is the largest of --%s; a larger "
                      "one may score higher on validation.", name, value,
                      name)
  if chosen[1] == 0.0:
    logging.info("Validation prefers the towers alone to any blend with "
                 "EASE: the run exports the towers.")
    return None, info
  if view.fit_splits != prep.fit_splits:
    (columns, values), = ease_tables(view, [lam], train.ease_top_k,
                                     neighbours)
  out = _Parts(exported, view.val, n, batch, info)
  built = out.blend(out.ease(columns, values, view.item_counts, chosen[2]),
                    chosen[1])
  built.blend.info["seconds"] = round(time.perf_counter() - start, 1)
  return built, built.blend.info


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
