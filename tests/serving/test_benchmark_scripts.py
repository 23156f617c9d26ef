"""Small runs of the export benchmarks, so their code cannot rot: they
produce sane figures (never checked for speed)."""

import json
import os
import subprocess
import sys

import pytest

import tiny_data

pytestmark = pytest.mark.xdist_group("serving")  # see conftest.py
BENCHMARKS = os.path.join(tiny_data.REPO, "benchmarks")


def _run(args, tmp_path, name):
  out = tmp_path / f"{name}.json"
  result = subprocess.run(
      [sys.executable, os.path.join(BENCHMARKS, f"{name}.py"), *args,
       f"--out={out}"], capture_output=True, text=True, timeout=600,
      cwd=tiny_data.REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(out.read_text())


def test_serve_latency(run, tmp_path):
  out = _run([f"--model_dir={run.model_dir}", "--requests=30"], tmp_path,
             "serve_latency")
  assert out["users_timed"] == 30 and out["k"] == tiny_data.SERVING_FLAGS[
      "export_k"]
  for part in ("serving_ms", "recommender_ms"):
    assert 0 < out[part]["p50"] <= out[part]["p99"]
  assert out["index_ms"]["scann_p50"] > 0 and out["index_ms"]["speedup"] > 0
  assert out["load_s"] > 0 and out["bytes_on_disk"]["serving"] > 0
  assert out["per_user_tables"]["known_events"] > 0


def test_scann_recall(tmp_path):
  rows = _run(["--sizes=600", "--queries=40", "--dim=16"], tmp_path,
              "scann_recall")
  (row,) = rows
  assert row["items"] == 600 and row["source"] == "synthetic"
  assert row["tuning_agreement"] >= 0.95 and 0.5 < row["recall@k"] <= 1.0
  assert row["builds"] >= 1 and row["build_s"] > 0
  assert row["num_leaves_to_search"] <= row["num_leaves"]
