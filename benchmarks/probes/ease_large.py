"""Probe: the blend's EASE past the dense inverse's cap, on a finished run.

Refits the run's blend (tt_mimic.training.blend.fit: lambda, w and beta
chosen on validation with dat, the export's tables refitted on training
plus validation) with one of three EASE stand-ins, and prints the choice,
its validation grid and the test Recall@20 / NDCG@20 of dat_refit blended
(by popularity tier). Writes nothing (docs/results.md, twenty-sixth
session).

- `neighbours:N`: `--ease_neighbours=N` (tt_mimic.model.ease
  .neighbourhood_rows), the product's own path above `--ease_max_items`,
  here at any corpus size.
- `subset:M`: exact EASE on the M books with the most fitted events only;
  the other books get no EASE weights (what a cap that keeps the head
  would give).
- `knn:H`: item-kNN, cosine of co-reads with shrinkage H,
  B_ij = G_ij / (sqrt(n_i n_j) + H), in EASE's place (a dense Gram: small
  corpora only).

    .venv/bin/python benchmarks/probes/ease_large.py <run>/seed_1 \
        neighbours:256 50       # mode:value, lambdas (comma-separated;
                                # knn: the shrinkages)
"""
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

import tt_mimic  # noqa: F401,E402

from tt_mimic.model import ease as ease_lib  # noqa: E402
from tt_mimic.training import blend as blend_lib  # noqa: E402
from tt_mimic.training import pipeline  # noqa: E402


def _subset_tables(m):
  def tables(prep, lams, top_k, neighbours=0):
    del neighbours
    users, items = blend_lib.fit_pairs(prep.data.events, prep.fit_splits)
    n = len(prep.data.items)
    counts = np.asarray(prep.item_counts)[1:]
    keep = np.sort(np.argsort(-counts, kind="stable")[:m])
    sub = np.full(n, -1)
    sub[keep] = np.arange(len(keep))
    inside = sub[items] >= 0
    print(f"  subset: {len(keep)} of {n} books, {inside.mean():.3f} of the "
          "fitted pairs", flush=True)
    for lam in lams:
      cols, vals = ease_lib.sparse_rows(
          ease_lib.fit(users[inside], sub[items[inside]], len(keep), lam),
          top_k)
      columns = np.zeros((n + 1, cols.shape[1]), np.int32)
      values = np.zeros((n + 1, cols.shape[1]), np.float32)
      columns[keep + 1] = np.where(cols[1:] > 0,
                                   keep[np.maximum(cols[1:] - 1, 0)] + 1, 0)
      values[keep + 1] = vals[1:]
      yield columns, values
  return tables


def _knn_tables(prep, shrinks, top_k, neighbours=0):
  del neighbours
  users, items = blend_lib.fit_pairs(prep.data.events, prep.fit_splits)
  gram = ease_lib.gram(users, items, len(prep.data.items))
  norm = np.sqrt(np.maximum(np.diag(gram), 1.0))
  for shrink in shrinks:
    weights = gram / (norm[:, None] * norm[None, :] + np.float32(shrink))
    np.fill_diagonal(weights, 0.0)
    yield ease_lib.sparse_rows(weights.astype(np.float32), top_k)


def main():
  run, (mode, value), lambdas = (sys.argv[1], sys.argv[2].split(":"),
                                 sys.argv[3])
  config, prep = pipeline.open_run(run)
  train = dataclasses.replace(
      config.train, ease_lambdas=tuple(float(x) for x in lambdas.split(",")))
  if mode == "neighbours":
    train = dataclasses.replace(train, ease_neighbours=int(value),
                                ease_max_items=1)  # at any corpus size
  else:
    blend_lib.ease_tables = (_subset_tables(int(value)) if mode == "subset"
                             else _knn_tables)
    train = dataclasses.replace(train, ease_max_items=10 ** 9)
  n = len(prep.data.items)
  chooser = pipeline.load_variant(run, config, prep, "dat")
  view = pipeline.view_for(prep, train, "dat_refit")
  exported = pipeline.load_variant(run, config, view, "dat_refit")
  start = time.perf_counter()
  built, info = blend_lib.fit(prep, view, chooser, exported, train)
  print(f"{mode}:{value} blend fitted in {time.perf_counter() - start:.0f} s;"
        " lambdas", [(g["lambda"], round(g["recall@20"], 4))
                     for g in info["lambdas"]])
  print(f"chose lambda {info['lambda']:g} w {info['w']:g} beta "
        f"{info['popularity_power']:g}: validation {info['val_recall@20']:.4f}")
  for g in info["weights"]:
    print(f"  validation w {g['w']:g} beta {g['popularity_power']:g}: "
          f"{g['recall@20']:.4f}")
  m = pipeline.test_metrics(
      pipeline.model_scorer(built if built is not None else exported, n),
      view, train.eval_batch_size)
  tiers = m["segments"]["item_popularity"]
  print(f"{mode}:{value} test recall@20 {m['recall@20']:.4f} ndcg@20 "
        f"{m['ndcg@20']:.4f} recall@100 {m['recall@100']:.4f}; recall@20 "
        + " ".join(f"{k} {v['recall@20']:.4f}" for k, v in tiers.items()))


if __name__ == "__main__":
  main()
