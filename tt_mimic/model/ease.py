"""EASE, the item-item model that the towers are blended with.

EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data",
WWW 2019): with the binary user x book matrix X,

  P = (X^T X + lambda I)^-1,  B = I - P diag(1 / diag(P)),  diag(B) = 0,

and a user's scores are x_u B: the sum of the rows of B of the books the
user knows. Its scores are far more peaked than the towers' and the two
rank complementary books (docs/results.md, twenty-third session), so the
exported model can add them up (`Blend`):

  score(u, i) = a * max_k <q_u,k, v_i> + sum over j known by u of W[j, i],

with a = (1 - w) / s_t and W = (w / s_e) B diag(n^-beta), where n_i is book
i's fitted events: EASE's scores divided by a power beta of the book's
popularity (`popularity_scaled`; beta = 0 is EASE as fitted), a correction
of the kind Steck's popularity-stratified recall applies to test books
("Item popularity and recommendation accuracy", RecSys 2011). s_t and s_e
are each model's median per-user standard deviation of its scores over the
corpus (one constant each, scores only, s_e of the scaled EASE), so that w
means the same for any scale.

Each book keeps the `top_k` entries of its row of B of the largest
magnitude (`sparse_rows`):
a user's EASE scores are then a scatter of a few hundred entries per known
book, cheap at serving time, and the table is books x top_k instead of
books x books. Exact EASE needs the dense books x books inverse, so it
has a cap on the corpus (`check_size`); `neighbourhood_rows` fits each
book on its most co-read books instead, with no dense books x books matrix.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf


class TooManyItemsError(ValueError):
  """EASE refuses a corpus whose books x books matrix is over the cap."""


def check_size(n_items: int, max_items: int, flag: str) -> None:
  """Raises TooManyItemsError when EASE would exceed the item cap; `flag`
  names the setting that raises the cap."""
  if n_items > max_items:
    gib = n_items ** 2 * 4 / 2 ** 30
    raise TooManyItemsError(
        f"EASE refuses {n_items:,} books: it inverts a dense books x books "
        f"matrix ({gib:.1f} GiB in float32; fitting holds about four) and "
        f"the cap is {max_items:,} books. Raise {flag} if the machine has the "
        "memory.")


def gram(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
  """X^T X of the binary user x book matrix of distinct 0-based pairs."""
  out = np.zeros((n_items, n_items), np.float32)
  order = np.lexsort((items, users))
  users, items = users[order], items[order]
  bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    row = items[lo:hi]
    out[np.ix_(row, row)] += 1.0  # distinct indices: += is exact
  return out


def _inverse_in_place(a: np.ndarray) -> np.ndarray:
  """Inverse of a symmetric positive definite float32 matrix.

  With SciPy, Cholesky (potrf/potri) in `a`'s own memory, then the lower
  triangle mirrored in row blocks; without it, np.linalg.inv (two more
  n x n arrays at peak). SciPy's LAPACK runs on one BLAS thread: the
  32-bit-integer OpenBLAS in SciPy's wheels segfaults in its threaded
  spotrf on large matrices (26,303 books here; 8,000 is fine).
  """
  try:
    # pylint: disable=import-outside-toplevel
    from scipy.linalg import lapack
    import threadpoolctl
  except ImportError:
    return np.linalg.inv(a)
  # a is symmetric and C-ordered: a.T is the same memory in Fortran order,
  # and LAPACK's upper triangle of a.T is the lower triangle of a.
  with threadpoolctl.threadpool_limits(1, "blas"):
    factor, info = lapack.spotrf(a.T, lower=0, overwrite_a=1, clean=0)
    if info == 0:
      factor, info = lapack.spotri(factor, lower=0, overwrite_c=1)
  if info != 0:
    raise np.linalg.LinAlgError(f"EASE: LAPACK potrf/potri info={info}")
  out = factor.T
  if not np.shares_memory(out, a):
    a[...] = out
  n, step = len(a), max(1, 2 ** 22 // max(len(a), 1))
  for lo in range(0, n, step):
    hi = min(n, lo + step)
    block = a[lo:hi, lo:hi]
    block[...] = np.tril(block) + np.tril(block, -1).T
    a[lo:hi, hi:] = a[hi:, lo:hi].T
  return a


def weights_from_gram(gram_matrix: np.ndarray, lam: float) -> np.ndarray:
  """B = I - P diag(1/diag(P)), P = (gram + lam I)^-1; overwrites the
  Gram matrix."""
  diag = np.arange(len(gram_matrix))
  gram_matrix[diag, diag] += np.float32(lam)
  p = _inverse_in_place(gram_matrix)
  p /= -np.diag(p).copy()[None, :]
  p[diag, diag] = 0.0
  return p


def fit(users: np.ndarray, items: np.ndarray, n_items: int,
        lam: float) -> np.ndarray:
  """[books, books] float32 EASE weights B from distinct 0-based pairs."""
  return weights_from_gram(gram(users, items, n_items), lam)


def _reads(users: np.ndarray, items: np.ndarray, n_items: int):
  """The binary user x book matrix X of distinct 0-based pairs, as SciPy
  CSC: book b's readers are indices[indptr[b]:indptr[b + 1]]."""
  from scipy import sparse  # pylint: disable=import-outside-toplevel
  return sparse.csc_matrix(
      (np.ones(len(users), np.float32), (users, items)),
      shape=(int(users.max()) + 1 if len(users) else 1, n_items))


def _gram_rows(x, x_rows, lo: int, hi: int):
  """Rows lo..hi-1 of X^T X as a SciPy CSR matrix (float32 counts), from
  X as CSC (`_reads`) and as CSR."""
  return (x[:, lo:hi].T @ x_rows).tocsr()


def _rank_in_groups(groups: np.ndarray) -> np.ndarray:
  """Each element's position within its run of equal values of the
  sorted `groups` (0 for a run's first)."""
  return np.arange(len(groups)) - np.searchsorted(groups, groups)


def _neighbours(g, targets: np.ndarray, neighbours: int):
  """Each target's `neighbours` books of the most co-occurrences (ties: the
  smaller index), itself left out, from `g`, the targets' rows of X^T X
  (`_gram_rows`): ([targets, N] indices, -1 past a book's co-occurring
  books; [targets, N] their counts)."""
  owner = np.repeat(np.arange(len(targets)), np.diff(g.indptr))
  keep = g.indices != targets[owner]
  owner, cols, counts = owner[keep], g.indices[keep], g.data[keep]
  order = np.lexsort((cols, -counts, owner))
  owner, cols, counts = owner[order], cols[order], counts[order]
  rank = _rank_in_groups(owner)
  keep = rank < neighbours
  index = np.full((len(targets), neighbours), -1, np.int64)
  value = np.zeros((len(targets), neighbours), np.float64)
  index[owner[keep], rank[keep]] = cols[keep]
  value[owner[keep], rank[keep]] = counts[keep]
  return index, value


def neighbourhood_rows(users: np.ndarray, items: np.ndarray, n_items: int,
                       lams: Sequence[float], neighbours: int, top_k: int,
                       block_entries: int = 2 ** 23
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """EASE restricted to neighbourhoods, as `sparse_rows`' tables, from
  distinct 0-based (user, book) pairs (a repeated pair would count twice).

  Column j of EASE's B is the ridge regression of book j's readers on all
  other books, (G_SS + lambda I)^-1 G_Sj with S every other book. Here S is
  the `neighbours` books that co-occur most with j (feature-selected SLIM,
  Ning and Karypis, "SLIM", ICDM 2011): one N x N solve per book and
  lambda, and no books x books matrix, so no cap on the corpus. With
  N >= books - 1 it is EASE but for the books that never co-occur with j
  (weight 0 here). The neighbourhoods and their Grams are counted once for
  all of `lams`.

  Args:
    lams: the L2 weights, one pair of tables each.
    neighbours: N.
    top_k: as `sparse_rows`.
    block_entries: about how many entries a step holds: the X^T X rows of
      a chunk of books (bounded by their readers' reads; at most this / N
      books), the (book, reader) entries of a block of neighbourhoods; a
      block's co-read pairs are bounded by 4 x this.

  Returns:
    An iterator of `sparse_rows`' tables for each of `lams` in turn (the
    fit runs when the first is asked for), k the largest row kept (at most
    `top_k`); each lambda's weights are freed once its tables are made.

  Raises:
    ValueError: `neighbours` < 1, or no `lams`.
  """
  if neighbours < 1:
    raise ValueError(f"neighbourhood EASE needs neighbours >= 1, not "
                     f"{neighbours}.")
  if not len(lams):  # pylint: disable=g-explicit-length-test
    raise ValueError("neighbourhood EASE needs at least one lambda.")
  return _neighbourhood_tables(users, items, n_items, list(lams),
                               int(neighbours), top_k, block_entries)


def _neighbourhood_tables(users, items, n_items, lams, neighbours, top_k,
                          block_entries):
  """`neighbourhood_rows`' tables, lambda by lambda."""
  sources, targets, weights = _neighbourhood_weights(
      users, items, n_items, lams, neighbours, block_entries)
  for i in range(len(weights)):
    values = np.concatenate(weights[i])
    weights[i] = None
    tables = _rows_from_entries(sources, targets, values, n_items, top_k)
    del values
    yield tables
    del tables


def _neighbourhood_weights(users, items, n_items, lams, neighbours,
                           block_entries):
  """B's nonzero entries B[source, target] of `neighbourhood_rows`:
  (sources, targets, one list of weight blocks per lambda)."""
  x = _reads(users, items, n_items)
  x_rows = x.tocsr()
  read = np.append(np.diff(x.indptr), 0)  # [-1]: the padding reads nothing
  width = max(1, min(neighbours, n_items - 1))
  diagonal = np.arange(width)
  sources, targets, weights = [], [], [[] for _ in lams]
  # Chunks of books whose X^T X rows hold about block_entries entries,
  # bounded by the reads of each book's readers (X^T X is never whole).
  row_bound = np.cumsum(np.rint(x.T @ np.diff(x_rows.indptr)).astype(
      np.int64))
  chunk = 0
  while chunk < n_items:
    end = max(chunk + 1, int(np.searchsorted(
        row_bound, (row_bound[chunk - 1] if chunk else 0) + block_entries,
        side="right")))
    # Also at most block_entries / N books (their neighbourhoods' arrays).
    end = min(end, chunk + max(1, block_entries // width))
    books = np.arange(chunk, min(n_items, end))
    chunk = books[-1] + 1
    index, value = _neighbours(_gram_rows(x, x_rows, books[0], chunk),
                               books, width)
    cost = np.cumsum(read[index].sum(axis=1) + width * width)
    lo = 0
    while lo < len(books):
      # At least one book per block, then as many as fit the bound.
      hi = max(lo + 1, int(np.searchsorted(
          cost, (cost[lo - 1] if lo else 0) + block_entries, side="right")))
      grams = _neighbourhood_grams(x, index[lo:hi], 4 * block_entries)
      real = index[lo:hi] >= 0
      sources.append(index[lo:hi][real].astype(np.int32))
      targets.append(np.broadcast_to(books[lo:hi, None],
                                     real.shape)[real].astype(np.int32))
      for lam, out in zip(lams, weights):
        a = grams.copy()
        a[:, diagonal, diagonal] += lam
        solved = np.linalg.solve(a, value[lo:hi, :, None])[..., 0]
        out.append(solved[real].astype(np.float32))
      lo = hi
  return np.concatenate(sources), np.concatenate(targets), weights


def _ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
  """The concatenated aranges [start, stop) (vectorized)."""
  lengths = stops - starts
  offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
  return np.repeat(starts, lengths) + np.arange(lengths.sum()) - offsets


def _neighbourhood_grams(x, index: np.ndarray, max_pairs: int
                         ) -> np.ndarray:
  """[targets, N, N] float64 G[S_t, S_t] = X_S^T X_S for each target's
  neighbours S_t (`_neighbours`' index; -1 rows and columns stay 0): the
  co-reads among S_t, counted from the readers of its books (`_reads`' X).

  The count pairs up each reader's books in S_t: a block whose pairs pass
  `max_pairs` is split in two, and a single target's are counted by a
  sparse product instead (memory N x N)."""
  count, width = index.shape
  readers, starts = x.indices, x.indptr
  owner, slot = np.nonzero(index >= 0)
  books = index[owner, slot]
  lengths = starts[books + 1] - starts[books]
  # One entry per (target, neighbour, reader), grouped by (target, reader):
  # each group's slots pair up with each other (the diagonal included).
  entry_owner = np.repeat(owner, lengths)
  entry_slot = np.repeat(slot, lengths)
  entry_user = readers[_ranges(starts[books], starts[books + 1])]
  order = np.lexsort((entry_user, entry_owner))
  entry_owner, entry_slot, entry_user = (entry_owner[order],
                                         entry_slot[order], entry_user[order])
  new = np.r_[True, (entry_owner[1:] != entry_owner[:-1])
              | (entry_user[1:] != entry_user[:-1])]
  group_start = np.flatnonzero(new)
  size = np.diff(np.r_[group_start, len(entry_owner)])
  if int(np.sum(size.astype(np.int64) ** 2)) > max_pairs:
    if count > 1:
      half = count // 2
      return np.concatenate([
          _neighbourhood_grams(x, index[:half], max_pairs),
          _neighbourhood_grams(x, index[half:], max_pairs)])
    return _sparse_neighbourhood_gram(x, index[0])[None]
  per_entry = np.repeat(size, size)
  left = np.repeat(np.arange(len(entry_owner)), per_entry)
  right = _ranges(np.repeat(group_start, size),
                  np.repeat(group_start + size, size))
  flat = ((entry_owner[left] * width + entry_slot[left]) * width
          + entry_slot[right])
  return np.bincount(flat, minlength=count * width * width).reshape(
      count, width, width).astype(np.float64)


def _sparse_neighbourhood_gram(x, books: np.ndarray) -> np.ndarray:
  """[N, N] float64 X_S^T X_S for one target's neighbours `books` (-1:
  none), by SciPy's sparse product (`_neighbourhood_grams`' layout)."""
  real = np.flatnonzero(books >= 0)
  picked = x[:, books[real]]
  out = np.zeros((len(books), len(books)), np.float64)
  out[np.ix_(real, real)] = (picked.T @ picked).toarray()
  return out


def _rows_from_entries(sources, targets, weights, n: int, top_k: int
                       ) -> tuple[np.ndarray, np.ndarray]:
  """`sparse_rows`' tables from B's nonzero entries B[source, target]
  (0-based): each source book keeps its `top_k` of the largest magnitude."""
  order = np.lexsort((targets, -np.abs(weights), sources))
  sources, targets, weights = sources[order], targets[order], weights[order]
  rank = _rank_in_groups(sources)
  keep = rank < top_k
  k = max(1, int(rank[keep].max()) + 1 if keep.any() else 1)
  columns = np.zeros((n + 1, k), np.int32)
  values = np.zeros((n + 1, k), np.float32)
  columns[sources[keep] + 1, rank[keep]] = targets[keep] + 1
  values[sources[keep] + 1, rank[keep]] = weights[keep]
  return columns, values


def sparse_rows(weights: np.ndarray, top_k: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Each book's `top_k` weights of the largest magnitude: (columns,
  values), with a row 0 for the padding book (no weights) and corpus
  indices (1-based). The negative weights count: without them, a user's
  many small positive weights favour popular books.

  Returns:
    columns: [books + 1, k] int32 corpus indices a book's row votes for
      (k = min(top_k, books); row 0 is all 0).
    values: [books + 1, k] float32, B[j, columns - 1].
  """
  n = len(weights)
  k = min(int(top_k), n)
  columns = np.zeros((n + 1, k), np.int32)
  values = np.zeros((n + 1, k), np.float32)
  step = max(1, 2 ** 24 // max(n, 1))
  for lo in range(0, n, step):
    block = weights[lo:lo + step]
    top = (np.argpartition(-np.abs(block), k - 1, axis=1)[:, :k] if k < n else
           np.broadcast_to(np.arange(n), block.shape))
    columns[lo + 1:lo + 1 + len(block)] = top + 1
    values[lo + 1:lo + 1 + len(block)] = np.take_along_axis(block, top, 1)
  return columns, values


def popularity_scaled(columns: np.ndarray, values: np.ndarray,
                      counts: np.ndarray, power: float) -> np.ndarray:
  """`sparse_rows`' values, each divided by its column's book's count to the
  `power` (counts below 1 count as 1).

  Args:
    columns, values: `sparse_rows`' tables.
    counts: [books + 1] each book's fitted events (index 0, the padding).
    power: beta >= 0; 0 gives the values back.
  """
  if power == 0:
    return values
  factor = np.maximum(np.asarray(counts, np.float64), 1.0) ** -float(power)
  return values * factor.astype(np.float32)[columns]


def scores(columns, values, books, num_items) -> tf.Tensor:
  """[batch, num_items + 1] summed rows of the books each user knows.

  Args:
    columns, values: `sparse_rows`' tables (rows of books beyond them, such
      as books added to the catalogue after training, count as none).
    books: [batch, L] int corpus indices of each user's known books (0 =
      padding); a book listed twice counts once.
    num_items: the corpus' books (at least the tables' rows - 1).
  """
  books = tf.cast(books, tf.int64)
  # Repeats count once, as X is binary: keep the first of each value.
  ranked = tf.sort(books, axis=1)
  repeat = tf.concat([tf.zeros_like(ranked[:, :1], tf.bool),
                      ranked[:, 1:] == ranked[:, :-1]], axis=1)
  rows_in_table = tf.cast(tf.shape(columns)[0], tf.int64)
  real = (ranked > 0) & (ranked < rows_in_table) & ~repeat
  # Only the real books are gathered: [known books, k], not
  # [batch, longest, k] (one heavy reader would inflate the whole batch).
  where = tf.where(real)
  known = tf.gather_nd(ranked, where)
  cols = tf.cast(tf.gather(columns, known), tf.int64)
  vals = tf.gather(values, known)
  row = tf.broadcast_to(where[:, :1], tf.shape(cols, tf.int64))
  index = tf.stack([tf.reshape(row, [-1]), tf.reshape(cols, [-1])], axis=1)
  batch = tf.shape(books, out_type=tf.int64)[0]
  # Column 0, the padding book, stays 0: only row 0 votes for it, and the
  # padding is never gathered.
  return tf.scatter_nd(index, tf.reshape(vals, [-1]),
                       tf.stack([batch, tf.cast(num_items, tf.int64) + 1]))


@dataclasses.dataclass
class Blend:
  """The towers' scores and EASE's, added up (see the module docstring).

  Attributes:
    columns, values: EASE's `sparse_rows`, the values already scaled by
      `popularity_scaled` and times w / s_e.
    tower_scale: a = (1 - w) / s_t, the towers' factor.
    info: what chose it: lambda, w, the popularity power, s_t, s_e,
      top_k, the validation grid.
  """
  columns: np.ndarray
  values: np.ndarray
  tower_scale: float
  info: dict

  def save(self, path: str) -> None:
    np.savez(path, columns=self.columns, values=self.values,
             tower_scale=np.float64(self.tower_scale))

  @classmethod
  def load(cls, path: str, info: dict) -> "Blend":
    with np.load(path) as f:
      return cls(f["columns"], f["values"], float(f["tower_scale"]), info)
