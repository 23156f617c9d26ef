"""Probe: how often an export's ScaNN path returns brute force's top-k, for
the first 500 known users (read books excluded). docs/results.md,
twenty-fourth session.

    .venv/bin/python benchmarks/probes/blend_agreement.py <run> 100
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

from tt_mimic.serving import recommender  # noqa: E402


def main():
  run, k = sys.argv[1], int(sys.argv[2])
  scann = recommender.Recommender(run, index="scann")
  brute = recommender.Recommender(run, index="brute_force")
  users = scann.known_users()[:500]
  shares = [len({r["parent_asin"] for r in a} & {r["parent_asin"] for r in b})
            / max(len(b), 1)
            for a, b in zip(scann.recommend_batch(users, k=k),
                            brute.recommend_batch(users, k=k))]
  print(f"{run}: top-{k} agreement of the ScaNN path with brute force over "
        f"{len(users)} users: mean {np.mean(shares):.4f}, "
        f"min {np.min(shares):.2f}")


if __name__ == "__main__":
  main()
