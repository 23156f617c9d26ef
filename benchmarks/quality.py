"""Quality benchmark: every variant and tuned simple peers over several seeds.

  .venv/bin/python benchmarks/quality.py --flagfile=flags/sample.cfg \
      --model_dir=/tmp/quality_sample --seeds=1,2,3 --peers=als,ease

Takes the training flags (flags/*.cfg and overrides) plus --seeds and
--peers; prints mean and standard deviation over seeds of the test metrics
(full corpus, each user's known books masked) and writes
<model_dir>/summary.json, <model_dir>/segments.md (Recall@20 by user and
book segment, mean ± std over seeds) and
<model_dir>/seed_<n>/metrics_with_peers.json.
The peers (benchmarks/peers.py: implicit ALS, EASE) fit on the training
events, are tuned on validation Recall@20 over the grids below and are
scored on test through the same `evaluation.evaluate` call as the towers.
ALS needs the `bench` extra (pip install -e .[bench]).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tt_mimic  # noqa: F401,E402
from tt_mimic.commands import common  # noqa: E402  (defines the run flags)
from tt_mimic.training import experiment  # noqa: E402
from tt_mimic.training import pipeline  # noqa: E402
from tt_mimic.training import report  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402

PEERS = ("als", "ease")
_SEEDS = flags.DEFINE_list("seeds", ["1", "2", "3"], "Seeds to run.")
_PEERS = flags.DEFINE_list(
    "peers", list(PEERS),
    "Simple peers to tune and score beside the variants (als, ease; empty "
    "for none).")
_ALS_GRID = flags.DEFINE_string(
    "als_grid", "64,128,256,512|1,5,10|1,10,30",
    "factors|alpha|reg candidate lists for ALS (confidence 1 + alpha), "
    "tuned on validation Recall@20.")
_ALS_ITERATIONS = flags.DEFINE_integer("als_iterations", 15,
                                       "ALS iterations (sweeps).")
_ALS_CG = flags.DEFINE_bool(
    "als_cg", True, "implicit's conjugate-gradient ALS solver (its default); "
    "--noals_cg solves each least-squares step exactly.")
_EASE_GRID = flags.DEFINE_list(
    "ease_grid", ["10", "50", "100", "200", "500", "1000", "2000"],
    "EASE lambda candidates, tuned on validation Recall@20.")
_PEER_THREADS = flags.DEFINE_integer(
    "peer_threads", 0, "implicit ALS threads (0 = all cores).")
METRICS = ("recall@20", "ndcg@20", "recall@100", "ndcg@100", "mrr")


def _floats(values) -> list[float]:
  return [float(v) for v in values if str(v).strip()]


def run_peers(prep, names, seed: int, batch_size: int,
              ease_max_items: int) -> dict:
  """{peer: test metrics with params, val, grid, seconds} for `names`."""
  out = {}
  if "als" in names:
    factors, alphas, regs = (_floats(part.split(","))
                             for part in _ALS_GRID.value.split("|"))
    out["als"] = peers.tune_als(
        prep, [int(f) for f in factors], alphas, regs, _ALS_ITERATIONS.value,
        seed, batch_size, _PEER_THREADS.value, _ALS_CG.value)
  if "ease" in names:
    out["ease"] = peers.tune_ease(prep, _floats(_EASE_GRID.value), batch_size,
                                  ease_max_items)
  for name, result in list(out.items()):
    logging.info("%s test (seed %d, %.1f s): %s params %s", name, seed,
                 result["seconds"], {k: round(float(result[k]), 4) for k in METRICS},
                 result["params"])
    if "refit_test" in result:
      # Refit on training + validation with the chosen setting: the
      # counterpart of dat_refit, under the same protocol.
      out[name + "_refit"] = result.pop("refit_test")
  return out


def main(argv):
  del argv
  root = common.MODEL_DIR.value
  base = common.run_config()
  peer_names = [p.strip() for p in _PEERS.value if p.strip()]
  unknown = sorted(set(peer_names) - set(PEERS))
  if unknown:
    raise app.UsageError(f"--peers: unknown {unknown}; choose from {PEERS}.")
  if "als" in peer_names:
    try:
      import implicit  # noqa: F401,E402  pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
      raise app.UsageError("--peers=als needs the implicit library: pip "
                           "install -e .[bench] (or leave als out).") from e
  per_seed = {}
  for seed in [int(s) for s in _SEEDS.value]:
    config = dataclasses.replace(
        base, train=dataclasses.replace(base.train, seed=seed))
    model_dir = os.path.join(root, f"seed_{seed}")
    prep = pipeline.start_run(config, model_dir, os.path.join(root, "ingest"))
    if "ease" in peer_names:  # refuse before any tower trains
      try:
        peers.ease_check_size(len(prep.data.items),
                              config.train.ease_max_items)
      except peers.TooManyItemsError as e:
        raise SystemExit(f"quality.py: {e}") from e
    variants = tuple(v for v in experiment.VARIANTS
                     if v in config.train.variants)
    metrics, _, _ = experiment.run(prep, config.tower, config.loss,
                                   config.train, variants, model_dir)
    metrics.update(run_peers(prep, peer_names, seed,
                             config.train.eval_batch_size,
                             config.train.ease_max_items))
    per_seed[seed] = metrics
    with open(os.path.join(model_dir, "metrics_with_peers.json"), "w") as f:
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
  segment_table = "\n".join(report.segments(list(per_seed.values())))
  print(f"\nTest segments over seeds {list(per_seed)}:\n\n{segment_table}")
  for name in peer_names:
    for seed in per_seed:
      result = per_seed[seed][name]
      print(f"{name} seed {seed}: {result['params']} (val recall@20 "
            f"{result['val']['recall@20']:.4f}, {result['seconds']:.1f} s)")
  with open(os.path.join(root, "summary.json"), "w") as f:
    json.dump({"seeds": list(per_seed), "summary": summary,
               "per_seed": per_seed}, f, indent=1, default=str)
  with open(os.path.join(root, "segments.md"), "w") as f:
    f.write(segment_table + "\n")


if __name__ == "__main__":
  app.run(main)
