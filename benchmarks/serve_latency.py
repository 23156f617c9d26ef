"""Latency of an exported run, in a fresh process: load time, size on disk,
one user's top-k through each path.

  .venv/bin/python benchmarks/serve_latency.py --model_dir=saved_models/sample \
      [--requests=300] [--out=/tmp/serve_latency.json]

Prints and writes (JSON):

  load_s           seconds to load the serving SavedModel and the ScaNN
                   index in this (fresh) process
  bytes_on_disk    per export part (from export.json)
  serving_ms       p50 / p99 of the self-contained serving model's
                   serving_default(user_id) -> top-k (brute force, the
                   user's read books excluded inside the model): what stock
                   TensorFlow Serving runs, without its HTTP layer
  recommender_ms   p50 / p99 of `Recommender.recommend` with the ScaNN
                   index (query signature, then the index), as `tt-mimic
                   serve` answers without its HTTP layer
  index_ms         p50 of the ScaNN index alone (embedding -> top-k; for a
                   blend with EASE, with EASE's part) and of brute force
                   over the same embeddings (the towers' part alone), and
                   their ratio

One user per request, known users cycled, after 20 warm-up requests.
Figures are this machine's under its current load.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

LOAD_START = time.monotonic()
import tt_mimic  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf  # noqa: E402
import tensorflow_recommenders as tfrs  # noqa: E402

from tt_mimic.serving import recommender  # noqa: E402


def _timed(call, arguments, warmup: int = 20) -> list[float]:
  for args in arguments[:warmup]:
    call(*args)
  times = []
  for args in arguments:
    start = time.perf_counter()
    call(*args)
    times.append(1000 * (time.perf_counter() - start))
  return times


def _summary(times: list[float]) -> dict:
  return {"p50": round(float(np.percentile(times, 50)), 3),
          "p99": round(float(np.percentile(times, 99)), 3)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model_dir", required=True)
  parser.add_argument("--requests", type=int, default=300)
  parser.add_argument("--out", default="")
  args = parser.parse_args()

  imported = time.monotonic()
  rec = recommender.Recommender(args.model_dir, index="scann")
  load_s = time.monotonic() - imported
  k = rec.k
  users = rec.known_users()[:args.requests]
  users = (users * (args.requests // max(len(users), 1) + 1))[:args.requests]

  serving = rec.serving.signatures["serving_default"]
  serving_ms = _timed(lambda u: serving(user_id=tf.constant([u])),
                      [(u,) for u in users])
  recommender_ms = _timed(lambda u: rec.recommend(u, k=k),
                          [(u,) for u in users])

  query = rec.serving.signatures["query"]
  queries = [query(user_id=tf.constant([u]), history=tf.constant([[""]]))
             for u in users]
  embeddings = [q["embedding"] for q in queries]
  known = tf.constant([True])
  exclude = tf.constant([[""]])
  search = rec.model.signatures["serving_default"]
  scann_ms = _timed(lambda q: search(known=known, exclude=exclude,
                                     **recommender.index_inputs(q)),
                    [(q,) for q in queries])
  vectors = np.load(os.path.join(rec.version_directory, "embeddings.npy"))
  brute = tfrs.layers.factorized_top_k.BruteForce(k=k)
  brute.index(tf.constant(vectors, tf.float32))
  # A query of several vectors ([1, interests, d]): one search each, as
  # the index does.
  brute_call = tf.function(
      lambda e: brute(tf.reshape(e, [-1, tf.shape(e)[-1]]), k=k))
  brute_ms = _timed(brute_call, [(e,) for e in embeddings])

  result = {
      "model_dir": args.model_dir, "items": len(rec.items), "k": k,
      "users_timed": len(users),
      "import_s": round(imported - LOAD_START, 2), "load_s": round(load_s, 2),
      "bytes_on_disk": rec.info.get("bytes_on_disk", {}),
      "per_user_tables": rec.info.get("per_user_tables", {}),
      "serving_ms": _summary(serving_ms),
      "recommender_ms": _summary(recommender_ms),
      "index_ms": {"scann_p50": _summary(scann_ms)["p50"],
                   "brute_force_p50": _summary(brute_ms)["p50"],
                   "speedup": round(float(np.median(brute_ms))
                                    / max(float(np.median(scann_ms)), 1e-9),
                                    1)}}
  print(json.dumps(result, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
