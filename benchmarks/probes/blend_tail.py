"""Probe: per-book blend weights for tail books, on a finished run.

A book i's score is (1 - w_i) towers / s_t + w_i m_i EASE / s_e with
w_i = w n_i / (n_i + c) (c = 0: w for every book) and m_i = n_i^-beta
(beta = 0: 1), n_i the book's fitted events over their median; s_t,
s_e as the blend's (tt_mimic.training.blend), of EASE unscaled. Validation: dat with EASE on
training events; test: dat_refit with EASE on training plus validation.
Prints Recall@20 / NDCG@20 and Recall@20 by popularity tier per point
(docs/results.md, twenty-fifth session).

    .venv/bin/python benchmarks/probes/blend_tail.py <run>/seed_1 200 \
        0.2:0:0,0.2:50:0,0.2:0:0.5     # w:c:beta, ...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

import tt_mimic  # noqa: F401,E402
import tensorflow as tf  # noqa: E402

from tt_mimic.training import blend as blend_lib  # noqa: E402
from tt_mimic.training import evaluation  # noqa: E402
from tt_mimic.training import pipeline  # noqa: E402


def main():
  run, lam = sys.argv[1], float(sys.argv[2])
  grid = [tuple(float(x) for x in g.split(":")) for g in sys.argv[3].split(",")]
  config, prep = pipeline.open_run(run)
  n = len(prep.data.items)
  for name, split in (("dat", "val"), ("dat_refit", "test")):
    view = pipeline.view_for(prep, config.train, name)
    built = pipeline.load_variant(run, config, view, name)
    columns, values = next(blend_lib.ease_tables(view, [lam],
                                                 config.train.ease_top_k))
    parts = blend_lib._Parts(built, view.val, n, 1024, {})  # pylint: disable=protected-access
    towers = parts.towers
    ease = pipeline.ease_scorer(columns, values, n)
    spread_ease = blend_lib.score_spread(ease, view.val, 1024)
    counts = np.asarray(view.item_counts, np.float32)
    eval_set = getattr(view, split)
    for w, c, beta in grid:
      share = counts / (counts + c) if c > 0 else np.ones_like(counts)
      power = (np.maximum(counts, 1) / np.median(counts[1:])) ** -beta
      wb = tf.constant((w * share)[None, :], tf.float32)
      pb = tf.constant(power[None, :], tf.float32)

      def score(batch, wb=wb, pb=pb):
        return ((1 - wb) * towers(batch) / parts.spread_towers
                + wb * pb * ease(batch) / spread_ease)
      m, ranked = evaluation.evaluate(score, eval_set, batch_size=1024,
                                      return_ranked=True)
      tiers = evaluation.segment_metrics(
          ranked, eval_set, view.item_counts,
          view.item_categories)["item_popularity"]
      print(f"{name} {split} w={w:g} c={c:g} beta={beta:g}: "
            f"recall@20 {m['recall@20']:.4f} ndcg@20 {m['ndcg@20']:.4f} "
            + " ".join(f"{k} {v['recall@20']:.4f}" for k, v in tiers.items()),
            flush=True)


if __name__ == "__main__":
  main()
