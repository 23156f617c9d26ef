"""ScaNN's automatic settings against brute force, across corpus sizes.

  .venv/bin/python benchmarks/scann_recall.py [--sizes=1700,25000,100000,1000000] \
      [--embeddings=<run>/export/embeddings.npy] [--queries=1000] \
      [--out=/tmp/scann_recall.json]

For each corpus size N: candidate vectors (the rows of --embeddings when
given and N fits, else synthetic: unit vectors around `N / 50` Gaussian
cluster centres in 128 dimensions, more diffuse than trained embeddings
and so harder to partition), two sets of queries drawn the same way, and
the ScaNN index the export would build (`export.scann_params` for N, k=100
plus the default 100 exclusions retrieved, searched leaves doubled until
the top-100 agreement on the first query set reaches 0.95, as the export
does on a sample of its users), and prints:

  recall@100   share of brute force's top 100 that ScaNN returns, mean
               over the second (held-out) query set
  builds       indexes built until the agreement held
  build_s      seconds to build them
  scann_ms, brute_ms, speedup
               p50 of one query's top-k (index only, in-process, after
               warm-up) for ScaNN and brute force, and their ratio

Figures go to --out as JSON. Timings are of this machine and its load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tt_mimic.config import ExportConfig
from tt_mimic.serving import export


def synthetic(n: int, dim: int, seed: int) -> np.ndarray:
  """[n, dim] unit vectors around n / 50 cluster centres."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(max(1, n // 50), dim)).astype(np.float32)
  which = rng.integers(0, len(centres), n)
  x = centres[which] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _p50_ms(layer, queries: np.ndarray, k: int, repeats: int = 200) -> float:
  call = tf.function(lambda q: layer(q, k=k))
  one = [tf.constant(queries[i:i + 1]) for i in range(min(repeats,
                                                           len(queries)))]
  for q in one[:10]:
    call(q)  # warm-up and tracing
  times = []
  for q in one:
    start = time.perf_counter()
    call(q)[1].numpy()
    times.append(time.perf_counter() - start)
  return 1000 * float(np.median(times))


def measure(vectors: np.ndarray, queries: np.ndarray, held_out: np.ndarray,
            config: ExportConfig) -> dict:
  """The export's ScaNN index for `vectors` (settings tuned on `queries`,
  as the export tunes them on its users), its recall@k on `held_out`
  queries, build time and latencies."""
  n = len(vectors)
  k = min(config.k, n)
  retrieve = min(config.k + config.max_exclusions, n)
  params = export.scann_params(n, dataclasses.replace(config, k=k))
  ids = tf.constant(np.arange(n).astype(str))
  brute = tfrs.layers.factorized_top_k.BruteForce(k=retrieve)
  brute.index(tf.constant(vectors), ids)
  scann, tuning = export._tuned_scann(  # pylint: disable=protected-access
      tf.constant(vectors), ids, tf.constant(queries), params, k, retrieve,
      brute, config)
  recall = export.agreement(tf.constant(held_out), brute, scann, k,
                            sample=len(held_out))
  scann_ms = _p50_ms(scann, held_out, k)
  brute_ms = _p50_ms(brute, held_out, k)
  return {"items": n, "k": k, **tuning[-1]["params"],
          "builds": len(tuning),
          "tuning_agreement": round(tuning[-1]["agreement_at_k"], 4),
          "recall@k": round(recall, 4),
          "build_s": round(sum(t["build_seconds"] for t in tuning), 2),
          "scann_ms": round(scann_ms, 3), "brute_ms": round(brute_ms, 3),
          "speedup": round(brute_ms / max(scann_ms, 1e-9), 1)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="1700,25000,100000,1000000")
  parser.add_argument("--embeddings", default="")
  parser.add_argument("--queries", type=int, default=1000)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  real = np.load(args.embeddings) if args.embeddings else None
  rows = []
  for n in (int(s) for s in args.sizes.split(",")):
    if real is not None and n <= len(real):
      rng = np.random.default_rng(n)
      vectors = real[rng.choice(len(real), n, replace=False)]
      queries = real[rng.choice(len(real), 2 * args.queries)]
      source = "embeddings"
    else:
      data = synthetic(n + 2 * args.queries, args.dim, seed=n)
      vectors, queries, source = data[:n], data[n:], "synthetic"
    queries = queries.astype(np.float32)
    row = {"source": source, **measure(vectors.astype(np.float32),
                                       queries[:args.queries],
                                       queries[args.queries:],
                                       ExportConfig())}
    rows.append(row)
    print(json.dumps(row), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
