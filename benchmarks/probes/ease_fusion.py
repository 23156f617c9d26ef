"""Probe: how much the towers and EASE add to each other.

A user's fused score for a book is (1 - w) z(towers) + w z(EASE). With
`user` (the default), z standardizes each model's scores over the corpus
per user (mean 0, std 1), so that the weight w means the same for any
model's scale. With `global`, z divides by one constant per model instead
(the median std over the split's first 2,048 users; scores only, no
targets), so the blend ranks as a fixed linear combination of the two
scores: one inner product of wider vectors (docs/results.md). w = 0 is the
towers alone, w = 1 EASE alone. Run on a finished run directory:
- validation: `dat` (fitted on training events) with EASE fitted on the
  same events, to choose w;
- test: `dat_refit` with EASE refitted on training plus validation events
  (the quality benchmark's protocol for both).
Prints Recall@20 / NDCG@20 / Recall@100 per w (docs/results.md,
twenty-third session). It measures how much the two models add to each
other; it builds nothing that ships.

    .venv/bin/python benchmarks/probes/ease_fusion.py <run>/seed_1 50 \
        0,0.3,0.5,0.7,1 [user|global]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import tt_mimic  # noqa: F401,E402
import tensorflow as tf  # noqa: E402

from tt_mimic.data import ingest  # noqa: E402
from tt_mimic.training import blend as blend_lib  # noqa: E402
from tt_mimic.training import evaluation  # noqa: E402
from tt_mimic.training import pipeline  # noqa: E402
import peers  # noqa: E402


def standardized(scores) -> tf.Tensor:
  """Each row's scores with mean 0 and std 1 (the padding column 0 included:
  one column of a corpus)."""
  mean, variance = tf.nn.moments(tf.convert_to_tensor(scores, tf.float32),
                                 axes=[1], keepdims=True)
  return (scores - mean) / tf.sqrt(variance + 1e-12)


def std_per_user(score_fn, eval_set, batches: int = 8) -> float:
  """The median over the first `batches` batches' users of each user's std
  of `score_fn`'s scores over the corpus."""
  stds = []
  for i, batch in enumerate(eval_set.dataset(256)):
    if i == batches:
      break
    _, variance = tf.nn.moments(tf.convert_to_tensor(score_fn(batch)),
                                axes=[1])
    stds.append(tf.sqrt(variance))
  return float(np.median(tf.concat(stds, 0).numpy()))


def main():
  run, lam = sys.argv[1], float(sys.argv[2])
  weights = [float(w) for w in sys.argv[3].split(",")]
  scale = sys.argv[4] if len(sys.argv) > 4 else "user"
  if scale not in ("user", "global"):
    sys.exit("ease_fusion: the scale is 'user' or 'global'.")
  config, prep = pipeline.open_run(run)
  n_items = len(prep.data.items)
  for name, split, splits in (("dat", "val", (ingest.SPLIT_TRAIN,)),
                              ("dat_refit", "test", peers.REFIT_SPLITS)):
    view = pipeline.view_for(prep, config.train, name)
    towers = pipeline.model_scorer(
        pipeline.load_variant(run, config, view, name), n_items)
    users, items = blend_lib.fit_pairs(prep.data.events, splits)
    ease = peers.ease_fit(users, items, n_items, lam)
    eval_set = getattr(view, split)
    if scale == "global":
      # One scale per model, from the split's users: the blend is then a
      # fixed linear combination of the two models' scores.
      spread = (std_per_user(towers, eval_set),
                std_per_user(peers.ease_scorer(ease, eval_set), eval_set))
      print(f"{name} {split}: median std per user, towers {spread[0]:.4g}, "
            f"EASE {spread[1]:.4g}", flush=True)
      normalize = [lambda s, d=d: tf.convert_to_tensor(s, tf.float32) / d
                   for d in spread]
    else:
      normalize = [standardized, standardized]
    for w in weights:
      scorer = peers.ease_scorer(ease, eval_set)  # one pass per scorer

      def fused(batch, w=w, scorer=scorer):
        return ((1 - w) * normalize[0](towers(batch))
                + w * normalize[1](scorer(batch)))
      m = evaluation.evaluate(fused, eval_set)
      print(f"{name} {split} w={w:g}: recall@20={m['recall@20']:.4f} "
            f"ndcg@20={m['ndcg@20']:.4f} recall@100={m['recall@100']:.4f}",
            flush=True)


if __name__ == "__main__":
  main()
