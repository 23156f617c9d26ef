"""Probe: validation Recall@20 of implicit ALS by rank, on the split of a
trained run (docs/results.md, third session). Each rank is tuned over alpha
5, 10, 20 x reg 1, 10, 100, 15 iterations. Needs the `bench` extra.

    .venv/bin/python benchmarks/probes/als_rank.py <model_dir> 64,128,256,512
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tt_mimic  # noqa: F401,E402
from tt_mimic.training import blend as blend_lib
from tt_mimic.training import pipeline, evaluation
import peers

config, prep = pipeline.open_run(sys.argv[1])
users, items = blend_lib.fit_pairs(prep.data.events)
nu, ni = len(prep.data.users), len(prep.data.items)
for f in [int(x) for x in sys.argv[2].split(",")]:
  best = None
  for a in [5.0, 10.0, 20.0]:
    for r in [1.0, 10.0, 100.0]:
      fitted = peers.als_fit(users, items, nu, ni, f, a, r, 15, 1, 0, True)
      m = evaluation.evaluate(peers.als_scorer(fitted, prep.val), prep.val, ks=(20,100))
      if best is None or m["recall@20"] > best[0]["recall@20"]:
        best = (m, a, r)
  m, a, r = best
  print(f"factors={f} alpha={a} reg={r}: val recall@20={m['recall@20']:.4f} ndcg@20={m['ndcg@20']:.4f} recall@100={m['recall@100']:.4f}", flush=True)
