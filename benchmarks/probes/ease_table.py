"""Probe: EASE's validation metrics with each book's row cut to its k
weights of the largest magnitude (what `--ease_top_k` keeps), against the
whole matrix. docs/results.md, twenty-fourth session.

    .venv/bin/python benchmarks/probes/ease_table.py <run>/seed_1 50 \
        256,512,1024
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

from tt_mimic.model import ease  # noqa: E402
from tt_mimic.training import blend  # noqa: E402
from tt_mimic.training import evaluation  # noqa: E402
from tt_mimic.training import pipeline  # noqa: E402


def main():
  run, lam = sys.argv[1], float(sys.argv[2])
  sizes = [int(k) for k in sys.argv[3].split(",")]
  _, prep = pipeline.open_run(run)
  n = len(prep.data.items)
  weights = ease.fit(*blend.fit_pairs(prep.data.events), n, lam)
  for k in sizes + [n]:
    columns, values = ease.sparse_rows(weights, k)
    m = evaluation.evaluate(pipeline.ease_scorer(columns, values, n), prep.val)
    label = "every weight" if k == n else f"top {k}"
    print(f"{label}: recall@20={m['recall@20']:.4f} "
          f"ndcg@20={m['ndcg@20']:.4f} recall@100={m['recall@100']:.4f}",
          flush=True)


if __name__ == "__main__":
  main()
