"""Tests for tt_mimic.training.plots and report.md's links to them.

Cheap: synthetic histories and metrics, no training (the served run's
report is checked in tests/serving/test_run_outputs.py).
"""

from __future__ import annotations

import os

from PIL import Image
import pytest

from tt_mimic.training import plots
from tt_mimic.training import report

PNG = b"\x89PNG\r\n\x1a\n"


def _history(epochs, scale):
  return [{"epoch": e, "loss_main": 5 - e * scale, "loss_u": 0.5 / e,
           "loss_v": 0.4 / e, "loss_ca": 0.01 * e,
           "val_recall@20": 0.05 * e * scale, "val_ndcg@20": 0.02 * e}
          for e in range(1, epochs + 1)]


RESULTS = {"popularity": {"history": []},
           "two_tower": {"history": _history(3, 1.0), "best_epoch": 3},
           "dat": {"history": _history(4, 1.2), "best_epoch": 4},
           "dat_refit": {"history": [], "refit": True, "best_epoch": 4}}
METRICS = {"popularity": {"recall@20": 0.05, "ndcg@20": 0.02,
                          "recall@100": 0.2, "mrr": 0.01},
           "two_tower": {"recall@20": 0.1, "ndcg@20": 0.04,
                         "recall@100": 0.3, "mrr": 0.03},
           "dat": {"recall@20": 0.12, "ndcg@20": 0.05, "recall@100": 0.33,
                   "mrr": 0.04, "segments": {}}}


def _check_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == PNG
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    width, height = image.size
  assert width > 100 and height > 100


def test_every_plot_is_a_valid_png(tmp_path):
  written = plots.write(str(tmp_path / "plots"), METRICS, RESULTS)
  assert set(written) == {"loss", "validation", "test_metrics"}
  for name, (caption, path) in written.items():
    assert caption and path == str(tmp_path / "plots" / f"{name}.png")
    _check_png(path)


def test_report_links_are_relative_and_resolve(tmp_path):
  links = report.plot_links(str(tmp_path), METRICS, RESULTS)
  for name, lines in links.items():
    assert lines[0].startswith("![") and lines[0].endswith(".png)")
    target = lines[0][lines[0].index("](") + 2:-1]
    assert target == f"plots/{name}.png"
    _check_png(tmp_path / target)


@pytest.mark.parametrize("results, metrics, expected", [
    ({"popularity": {"history": []}}, {"popularity": {"recall@20": 0.1}},
     {"test_metrics"}),  # no curves without histories
    ({}, {}, set()),
])
def test_nothing_to_show_writes_nothing(tmp_path, results, metrics, expected):
  written = plots.write(str(tmp_path), metrics, results)
  assert set(written) == expected
  assert sorted(os.listdir(tmp_path)) == sorted(f"{n}.png" for n in expected)
