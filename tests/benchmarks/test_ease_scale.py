"""A small run of benchmarks/ease_scale.py, so its code cannot rot (its
figures are never checked for speed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd

import tiny_data
from tt_mimic.data import ingest
from tt_mimic.training import pipeline


def test_ease_scale_fits_every_lambda_and_matches_the_baseline(tmp_path):
  rng = np.random.default_rng(0)
  users = np.repeat(np.arange(1, 41), 6)
  items = np.concatenate([rng.choice(np.arange(1, 31), 6, replace=False)
                          for _ in range(40)])
  split = np.where(rng.random(len(users)) < 0.8, ingest.SPLIT_TRAIN,
                   ingest.SPLIT_VAL)
  directory = tmp_path / "ingest" / "key"
  directory.mkdir(parents=True)
  pd.DataFrame({"user": users, "item": items, "split": split}).to_parquet(
      directory / "events.parquet")
  pd.DataFrame({"parent_asin": [f"b{i}" for i in range(30)]}).to_parquet(
      directory / "items.parquet")
  (directory / "ingest_report.json").write_text("{}")
  (tmp_path / pipeline.RUN_FILE).write_text(
      json.dumps({"ingest_dir": "ingest/key"}))
  for refit in ("--norefit", "--refit"):
    result = subprocess.run(
        [sys.executable, os.path.join(tiny_data.REPO, "benchmarks",
                                      "ease_scale.py"),
         f"--model_dir={tmp_path}", "--lambdas=2,20", "--neighbours=5",
         "--top_k=8", "--baseline", refit],
        capture_output=True, text=True, timeout=300, cwd=tiny_data.REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    fitted = int(np.unique(users * 100 + items if refit == "--refit" else
                           (users * 100 + items)[split == 0]).size)
    assert f"30 books, 40 users, {fitted} pairs" in result.stdout
    assert "every lambda at once (2)" in result.stdout
    assert "same tables" in result.stdout
