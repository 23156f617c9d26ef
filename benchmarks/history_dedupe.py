"""Speed of the user tower's history features with and without dedupe.

  .venv/bin/python benchmarks/history_dedupe.py [--items=15000 --batch=512]

Times a forward and backward pass of `towers.embed_history` over random
batches of histories (Zipf-distributed books, like real reading), once
embedding every history slot and once embedding each distinct book of the
batch once, in the same process, and prints the ratio. Also checks that
both give the same features.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tt_mimic  # noqa: F401,E402
import tensorflow as tf  # noqa: E402

from tt_mimic.model import towers  # noqa: E402

_ITEMS = flags.DEFINE_integer("items", 15000, "Corpus size.")
_BATCH = flags.DEFINE_integer("batch", 512, "Histories per batch.")
_HISTORY = flags.DEFINE_integer("history", 50, "History length.")
_DIM = flags.DEFINE_integer("dim", 128, "Embedding width.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per variant.")


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  n = _ITEMS.value
  table = towers.make_item_table({
      "id": np.arange(n + 1),
      "author": rng.integers(1, 300, n + 1),
      "categories": rng.integers(0, 300, (n + 1, 4)),
      "title": rng.integers(0, 20000, (n + 1, 12)),
  })
  sizes = {"authors": 300, "categories": 300, "title_tokens": 20000,
           "items": n, "users": 1}
  tower = towers.UserTower(sizes, towers.TowerConfig(_DIM.value, (256,),
                                                     _DIM.value),
                           table, towers.ItemFeatureEmbedding(sizes, _DIM.value))
  ranks = np.arange(1, n + 1)
  popularity = (1.0 / ranks) / np.sum(1.0 / ranks)
  batches = [tf.constant(rng.choice(ranks, (_BATCH.value, _HISTORY.value),
                                    p=popularity)) for _ in range(4)]
  tower({"user_id": tf.zeros([1], tf.int64), "history": batches[0][:1]})

  def step_fn(dedupe):
    @tf.function
    def step(history):
      with tf.GradientTape() as tape:
        out = towers.embed_history(tower.embed_books, history, dedupe)
        loss = tf.reduce_sum(tf.square(out))
      return out, tape.gradient(loss, tower.trainable_variables)
    return step

  steps = {d: step_fn(d) for d in (False, True)}
  for d in steps:  # trace and warm up
    steps[d](batches[0])
  a, _ = steps[False](batches[1])
  b, _ = steps[True](batches[1])
  np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
  seconds = {}
  for d in (False, True, False, True):  # interleaved against drift
    start = time.perf_counter()
    for i in range(_STEPS.value):
      out, grads = steps[d](batches[i % len(batches)])
    float(tf.reduce_sum(out))
    seconds[d] = seconds.get(d, 0.0) + time.perf_counter() - start
  distinct = np.mean([len(np.unique(x.numpy())) for x in batches])
  print(f"corpus {n}, batch {_BATCH.value} x history {_HISTORY.value}: "
        f"{distinct:.0f} distinct books per batch on average")
  per_step = {d: 1000 * s / (2 * _STEPS.value) for d, s in seconds.items()}
  print(f"every slot embedded : {per_step[False]:.1f} ms/step")
  print(f"distinct books once : {per_step[True]:.1f} ms/step")
  print(f"speed-up            : {seconds[False] / seconds[True]:.2f}x")


if __name__ == "__main__":
  app.run(main)
