"""Quality benchmark: every variant (and tuned implicit ALS) over several seeds.

  .venv/bin/python benchmarks/quality.py --flagfile=flags/sample.cfg \
      --model_dir=/tmp/quality_sample --seeds=1,2,3 --als

Takes the training flags (flags/*.cfg and overrides) plus --seeds and
--als; prints mean and standard deviation over seeds of the test metrics
(full corpus, training books masked) and writes <model_dir>/summary.json.
ALS is tuned on the validation split (a small grid) and scored on test.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tt_mimic  # noqa: F401,E402
import tensorflow as tf  # noqa: E402
from tt_mimic.commands import common  # noqa: E402  (defines the run flags)
from tt_mimic.data import ingest  # noqa: E402
from tt_mimic.training import evaluation  # noqa: E402
from tt_mimic.training import experiment  # noqa: E402
from tt_mimic.training import pipeline  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import als  # noqa: E402

_SEEDS = flags.DEFINE_list("seeds", ["1", "2", "3"], "Seeds to run.")
_ALS = flags.DEFINE_bool("als", True, "Also run tuned implicit ALS.")
_ALS_GRID = flags.DEFINE_string(
    "als_grid", "64,128|1,10,40|0.1,1,10",
    "factors|alpha|reg candidate lists for ALS, tuned on validation.")
METRICS = ("recall@20", "ndcg@20", "recall@100", "ndcg@100", "mrr")


def run_als(prep, grid: str, seed: int) -> dict:
  """Tunes ALS on validation recall@20, returns its test metrics."""
  train_events = prep.data.events[prep.data.events["split"]
                                  == ingest.SPLIT_TRAIN]
  users = train_events["user"].to_numpy() - 1
  items = train_events["item"].to_numpy() - 1
  n_users, n_items = len(prep.data.users), len(prep.data.items)
  factors, alphas, regs = ([float(v) for v in part.split(",")]
                           for part in grid.split("|"))
  best = (-1.0, None)
  for f, a, r in itertools.product(factors, alphas, regs):
    x, y = als.fit(users, items, n_users, n_items, int(f), a, r, 10, seed)
    val = evaluation.evaluate(_scorer(prep.val, x, y), prep.val)
    logging.info("ALS factors=%d alpha=%g reg=%g: val recall@20 %.4f", f, a,
                 r, val["recall@20"])
    if val["recall@20"] > best[0]:
      best = (val["recall@20"], (x, y, {"factors": f, "alpha": a, "reg": r}))
  x, y, params = best[1]
  test = evaluation.evaluate(_scorer(prep.test, x, y), prep.test)
  test["params"] = params
  return test


def _scorer(eval_set, x, y):
  """Scores by ALS factors; EvalSet batches are in user order."""
  items = np.vstack([np.zeros((1, y.shape[1])), y]).astype(np.float32)
  users = x[eval_set.users - 1].astype(np.float32)
  state = {"row": 0}

  def score(batch):
    n = int(batch["user_id"].shape[0])
    q = users[state["row"]:state["row"] + n]
    state["row"] += n
    return tf.matmul(q, items, transpose_b=True)
  return score


def main(argv):
  del argv
  root = common.MODEL_DIR.value
  base = common.run_config()
  per_seed = {}
  for seed in [int(s) for s in _SEEDS.value]:
    config = dataclasses.replace(
        base, train=dataclasses.replace(base.train, seed=seed))
    model_dir = os.path.join(root, f"seed_{seed}")
    prep = pipeline.start_run(config, model_dir, os.path.join(root, "ingest"))
    variants = tuple(v for v in experiment.VARIANTS
                     if v in config.train.variants)
    metrics, _, _ = experiment.run(prep, config.tower, config.loss,
                                   config.train, variants, model_dir)
    if _ALS.value:
      metrics["als"] = run_als(prep, _ALS_GRID.value, seed)
      logging.info("ALS test (seed %d): %s", seed, {
          k: v for k, v in metrics["als"].items() if k in METRICS + ("params",)})
    per_seed[seed] = metrics
    with open(os.path.join(model_dir, "metrics_with_als.json"), "w") as f:
      json.dump(metrics, f, indent=1, default=str)
  names = list(next(iter(per_seed.values())))
  summary = {}
  lines = ["| variant | " + " | ".join(METRICS) + " |",
           "|---|" + "---|" * len(METRICS)]
  for name in names:
    cells = []
    for metric in METRICS:
      values = np.array([per_seed[s][name][metric] for s in per_seed])
      summary.setdefault(name, {})[metric] = {
          "mean": float(values.mean()), "std": float(values.std()),
          "values": values.tolist()}
      cells.append(f"{values.mean():.4f} ± {values.std():.4f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  print(f"\nTest metrics over seeds {list(per_seed)} (mean ± std):\n{table}")
  with open(os.path.join(root, "summary.json"), "w") as f:
    json.dump({"seeds": list(per_seed), "summary": summary,
               "per_seed": per_seed}, f, indent=1, default=str)


if __name__ == "__main__":
  app.run(main)
