"""Probe: how much of EASE's lead a k-wide dot product can keep.

A user's EASE scores are x_u B (peers.py). Two rank-k versions, each
scored on validation Recall@20 / NDCG@20 on the split of a trained run
(docs/results.md, eighteenth session):
- "B rank k": B's best rank-k approximation U_k S_k V_k^T (truncated SVD,
  Eckart-Young). The scores are then the dot product of a k-wide user
  vector (the sum of the user's books' rows of U_k S_k) with a k-wide book
  vector (V_k's row): a linear two-tower model of width k.
- "scores in k dims": every user's EASE scores projected onto the top k
  right singular vectors V_k of the training users' score matrix X B
  (x_u B V_k V_k^T). A model that scores a user with one k-wide dot
  product has a score matrix of rank at most k, and X B V_k V_k^T is the
  rank-k matrix nearest EASE's in least squares (Eckart-Young; the seen,
  masked entries count there, not in ranking). Models with several
  vectors per user and a max over them are not bound to rank k.
The SVDs are randomized (Halko, Martinsson & Tropp, SIAM Review 2011: a
Gaussian sketch of k + 64 columns, four power iterations). SciPy (the
`bench` extra) lowers EASE's peak memory (peers.py).

    .venv/bin/python benchmarks/probes/ease_rank.py <model_dir> <lambda> \
        128,512 [b,scores]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402

import tt_mimic  # noqa: F401,E402
from tt_mimic.training import blend as blend_lib  # noqa: E402
from tt_mimic.training import pipeline, evaluation  # noqa: E402
import peers  # noqa: E402


def top_singular(b: np.ndarray, k: int, rng: np.random.Generator,
                 oversample: int = 64, power: int = 4):
  """U_k * S_k and V_k of b's leading k singular triplets (randomized)."""
  sketch = b @ rng.standard_normal((b.shape[1], k + oversample),
                                   dtype=np.float32)
  q, _ = np.linalg.qr(sketch)
  for _ in range(power):
    q, _ = np.linalg.qr(b.T @ q)
    q, _ = np.linalg.qr(b @ q)
  u, s, vt = np.linalg.svd(q.T @ b, full_matrices=False)
  return (q @ u[:, :k]) * s[:k], vt[:k].T


def report(name: str, weights: np.ndarray, prep) -> None:
  m = evaluation.evaluate(peers.ease_scorer(weights, prep.val), prep.val,
                          ks=(20, 100))
  print(f"{name}: val recall@20={m['recall@20']:.4f} "
        f"ndcg@20={m['ndcg@20']:.4f} recall@100={m['recall@100']:.4f}",
        flush=True)


def main():
  lam = float(sys.argv[2])
  ranks = [int(x) for x in sys.argv[3].split(",")]
  kinds = sys.argv[4].split(",") if len(sys.argv) > 4 else ["b", "scores"]
  unknown = set(kinds) - {"b", "scores"}
  if unknown:
    sys.exit(f"ease_rank: unknown kinds {sorted(unknown)}; use b, scores.")
  _, prep = pipeline.open_run(sys.argv[1])
  users, items = blend_lib.fit_pairs(prep.data.events)
  b = peers.ease_fit(users, items, len(prep.data.items), lam)
  report(f"EASE lambda={lam:g}, full rank", b, prep)
  rng = np.random.default_rng(0)
  if "b" in kinds:
    for k in ranks:
      left, right = top_singular(b, k, rng)
      report(f"B rank {k}", left @ right.T, prep)
  if "scores" in kinds:
    # The training users' score matrix X B, one row per user.
    x = np.zeros((len(prep.data.users), len(prep.data.items)), np.float32)
    x[users, items] = 1.0
    scores = x @ b
    del x
    for k in ranks:
      _, right = top_singular(scores, k, rng)
      report(f"scores in {k} dims", (b @ right) @ right.T, prep)


if __name__ == "__main__":
  main()
