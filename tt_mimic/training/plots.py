"""PNG plots for `report.md`: training curves and test metrics.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, so the
process's backend and any open figures are left alone):

  plots/loss.png        each loss term per epoch, one line per variant
  plots/validation.png  validation Recall@20 and NDCG@20 per epoch
  plots/test_metrics.png  test metrics of every variant, baselines
                        (popularity, id_only) hatched

Refit variants train a fixed number of epochs without validation and have
no curves; a plot with nothing to show is not written.
"""

from __future__ import annotations

import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
import numpy as np

LOSS_TERMS = ("loss_main", "loss_u", "loss_v", "loss_ca")
VALIDATION = ("val_recall@20", "val_ndcg@20")
TEST_METRICS = ("recall@20", "ndcg@20", "recall@100", "mrr")
BASELINES = ("popularity", "popularity_refit", "id_only")
_DPI = 80


def _save(figure: Figure, path: str) -> str:
  FigureCanvasAgg(figure)
  figure.tight_layout()
  figure.savefig(path, dpi=_DPI)
  return path


def _curves(results: dict, keys: tuple[str, ...], title: str,
            path: str) -> str | None:
  """One panel per key present in some history: a line per variant."""
  histories = {name: r["history"] for name, r in results.items()
               if r.get("history")}
  keys = [k for k in keys
          if any(k in h for rows in histories.values() for h in rows)]
  if not keys:
    return None
  figure = Figure(figsize=(3.2 * len(keys), 2.8))
  for i, key in enumerate(keys):
    axes = figure.add_subplot(1, len(keys), i + 1)
    for name, rows in histories.items():
      points = [(h["epoch"], h[key]) for h in rows if key in h]
      if points:
        x, y = zip(*points)
        axes.plot(x, y, marker="o", markersize=3, label=name)
    axes.set_title(key.replace("val_", "validation "), fontsize=9)
    axes.set_xlabel("epoch", fontsize=8)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.tick_params(labelsize=7)
    if i == 0:
      axes.legend(fontsize=7)
  figure.suptitle(title, fontsize=10)
  return _save(figure, path)


def _test_bars(metrics: dict, path: str) -> str | None:
  """Grouped bars: one group per metric, one bar per variant."""
  names = list(metrics)
  keys = [k for k in TEST_METRICS if any(k in metrics[n] for n in names)]
  if not names or not keys:
    return None
  figure = Figure(figsize=(1.6 * len(keys) + 2.5, 3.0))
  axes = figure.add_subplot(1, 1, 1)
  width = 0.8 / len(names)
  x = np.arange(len(keys))
  for i, name in enumerate(names):
    values = [metrics[name].get(k, np.nan) for k in keys]
    axes.bar(x + i * width, values, width, label=name,
             hatch="//" if name in BASELINES else None, edgecolor="white")
  axes.set_xticks(x + width * (len(names) - 1) / 2, keys, fontsize=8)
  axes.tick_params(labelsize=7)
  axes.set_title("Test metrics (hatched: baselines)", fontsize=10)
  axes.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
  return _save(figure, path)


def write(directory: str, metrics: dict,
          results: dict) -> dict[str, tuple[str, str]]:
  """Writes the plots into `directory`.

  Args:
    directory: where the PNGs go (created).
    metrics: test metrics by variant (metrics.json's layout).
    results: training results by variant, with per-epoch `history`.

  Returns:
    {"loss" | "validation" | "test_metrics": (caption, path)} of the plots
    written.
  """
  os.makedirs(directory, exist_ok=True)
  path = lambda name: os.path.join(directory, f"{name}.png")  # noqa: E731
  plots = {
      "loss": ("Training losses per epoch", _curves(
          results, LOSS_TERMS, "Training losses (as logged at each epoch's "
          "end)", path("loss"))),
      "validation": ("Validation metrics per epoch", _curves(
          results, VALIDATION, "Validation (full corpus)",
          path("validation"))),
      "test_metrics": ("Test metrics against the baselines",
                       _test_bars(metrics, path("test_metrics"))),
  }
  return {name: (caption, file) for name, (caption, file) in plots.items()
          if file}
