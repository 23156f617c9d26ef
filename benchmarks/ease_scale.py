"""Time and peak memory of the blend's neighbourhood EASE on a run's data.

  .venv/bin/python benchmarks/ease_scale.py --model_dir=<run> [--baseline]
      [--refit] [--lambdas=50,200,500] [--neighbours=256]

Reads the run's ingested events (run.json's ingest directory; the run
need not have trained), fits `tt_mimic.model.ease.neighbourhood_rows` on
the training pairs (with --refit, training plus validation: the export's
fit) at every lambda at once, as the blend does, and prints the wall
time and the process's peak RSS. With --baseline it then fits each lambda
alone (one neighbourhood fit per lambda, as the blend did before
2026-12-07, with today's chunked X^T X), prints that time and the ratio,
and checks that both give the same tables. Defaults are the blend's
(`TrainConfig`). Figures are this machine's under its current load; the
peak RSS is the process's (the data included).
"""

from __future__ import annotations

import os
import resource
import sys
import time

from absl import app
from absl import flags
import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import tt_mimic  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)

from tt_mimic.config import TrainConfig  # noqa: E402
from tt_mimic.data import ingest  # noqa: E402
from tt_mimic.model import ease as ease_lib  # noqa: E402
from tt_mimic.training import blend as blend_lib  # noqa: E402
from tt_mimic.training import pipeline  # noqa: E402

_DEFAULTS = TrainConfig()
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "A run directory whose "
                                 "ingest has run.", required=True)
_LAMBDAS = flags.DEFINE_list(
    "lambdas", [f"{x:g}" for x in _DEFAULTS.ease_lambdas], "EASE's L2 weights.")
_NEIGHBOURS = flags.DEFINE_integer("neighbours", _DEFAULTS.ease_neighbours,
                                   "Books per neighbourhood.", lower_bound=1)
_TOP_K = flags.DEFINE_integer("top_k", _DEFAULTS.ease_top_k,
                              "Weights kept per book.", lower_bound=1)
_REFIT = flags.DEFINE_bool("refit", False, "Fit on training plus validation "
                           "events (the export's fit) instead of training.")
_BASELINE = flags.DEFINE_bool("baseline", False, "Also fit each lambda alone "
                              "and print the ratio.")


def _peak_gib() -> float:
  """This process' peak RSS (ru_maxrss: KiB on Linux, bytes on macOS)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)


def main(argv):
  del argv
  directory = pipeline.ingest_directory(_MODEL_DIR.value)
  events = pd.read_parquet(os.path.join(directory, "events.parquet"),
                           columns=["user", "item", "split"])
  n = len(pd.read_parquet(os.path.join(directory, "items.parquet"),
                          columns=["parent_asin"]))
  splits = ((ingest.SPLIT_TRAIN, ingest.SPLIT_VAL) if _REFIT.value
            else (ingest.SPLIT_TRAIN,))
  users, items = blend_lib.fit_pairs(events, splits)
  del events
  reads = np.bincount(users).astype(np.int64)
  print(f"{n:,} books, {len(reads):,} users, {len(users):,} pairs; "
        f"sum of squared user reads {int((reads ** 2).sum()):,} (bounds "
        f"X^T X's nonzeros), most reads by a user {reads.max():,}",
        flush=True)
  lams = [float(x) for x in _LAMBDAS.value]
  start = time.perf_counter()
  together = list(ease_lib.neighbourhood_rows(users, items, n, lams,
                                              _NEIGHBOURS.value, _TOP_K.value))
  seconds = time.perf_counter() - start
  print(f"every lambda at once ({len(lams)}): {seconds:.1f} s, peak RSS "
        f"{_peak_gib():.2f} GiB", flush=True)
  if not _BASELINE.value:
    return
  start = time.perf_counter()
  for lam, (columns, values) in zip(lams, together):
    [(alone_columns, alone_values)] = ease_lib.neighbourhood_rows(
        users, items, n, [lam], _NEIGHBOURS.value, _TOP_K.value)
    if not (np.array_equal(columns, alone_columns)
            and np.array_equal(values, alone_values)):
      raise SystemExit(f"lambda {lam:g}: the tables differ")
  alone = time.perf_counter() - start
  print(f"each lambda alone: {alone:.1f} s; at once is {alone / seconds:.2f}x "
        f"as fast; same tables; peak RSS {_peak_gib():.2f} GiB", flush=True)


if __name__ == "__main__":
  app.run(main)
