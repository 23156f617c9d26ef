"""Implicit-feedback ALS (Hu, Koren & Volinsky, ICDM 2008), a rival baseline.

Confidence c_ui = 1 + alpha for observed (user, book) pairs (preference 1),
1 elsewhere (preference 0). Each half-step solves, for every row,
  x_u = (Y^T Y + alpha Y_u^T Y_u + reg I)^-1 (1 + alpha) Y_u^T 1
where Y_u are the factors of the row's observed columns. NumPy only.
"""

from __future__ import annotations

import numpy as np


def _csr(rows: np.ndarray, cols: np.ndarray, n_rows: int):
  order = np.argsort(rows, kind="stable")
  indptr = np.searchsorted(rows[order], np.arange(n_rows + 1))
  return indptr, cols[order]


def _half_step(indptr, indices, other, alpha, reg):
  k = other.shape[1]
  gram = other.T @ other + reg * np.eye(k)
  out = np.zeros((len(indptr) - 1, k))
  for row in range(len(indptr) - 1):
    cols = indices[indptr[row]:indptr[row + 1]]
    if cols.size == 0:
      continue
    y = other[cols]
    a = gram + alpha * (y.T @ y)
    b = (1.0 + alpha) * y.sum(axis=0)
    out[row] = np.linalg.solve(a, b)
  return out


def fit(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int,
        factors: int = 64, alpha: float = 10.0, reg: float = 1.0,
        iterations: int = 10, seed: int = 0):
  """Factors for (user, item) index pairs (0-based).

  Returns:
    ([n_users, factors], [n_items, factors]) arrays.
  """
  rng = np.random.default_rng(seed)
  x = rng.normal(0, 0.01, (n_users, factors))
  y = rng.normal(0, 0.01, (n_items, factors))
  by_user = _csr(users, items, n_users)
  by_item = _csr(items, users, n_items)
  for _ in range(iterations):
    x = _half_step(*by_user, y, alpha, reg)
    y = _half_step(*by_item, x, alpha, reg)
  return x, y
