"""EASE's closed form and its sparse tables (tt_mimic.model.ease)."""

import numpy as np
import pytest

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tt_mimic.model import ease


def _pairs(seed=0, users=40, items=12, per_user=4):
  rng = np.random.default_rng(seed)
  u = np.repeat(np.arange(users), per_user)
  i = np.concatenate([rng.choice(items, per_user, replace=False)
                      for _ in range(users)])
  return u, i


def test_fit_is_steck_closed_form():
  users, items = _pairs()
  x = np.zeros((40, 12))
  x[users, items] = 1.0
  p = np.linalg.inv(x.T @ x + 7.0 * np.eye(12))
  expected = np.eye(12) - p / np.diag(p)[None, :]
  np.fill_diagonal(expected, 0.0)
  got = ease.fit(users, items, 12, 7.0)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  assert np.all(np.diag(got) == 0.0)


def test_full_tables_give_the_dense_scores():
  users, items = _pairs(1)
  weights = ease.fit(users, items, 12, 3.0)
  columns, values = ease.sparse_rows(weights, 12)
  books = np.array([[3, 5, 0, 0], [12, 1, 1, 0]])  # corpus indices, 0 = pad
  got = ease.scores(columns, values, books, 12).numpy()
  expected = np.zeros((2, 13), np.float32)
  expected[0, 1:] = weights[2] + weights[4]
  expected[1, 1:] = weights[11] + weights[0]  # book 1 twice counts once
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_popularity_scaling_divides_each_book_by_its_count():
  users, items = _pairs(3)
  weights = ease.fit(users, items, 12, 3.0)
  columns, values = ease.sparse_rows(weights, 12)
  counts = np.r_[0, np.arange(12)]  # corpus book 1 has none: counts as 1
  scaled = ease.popularity_scaled(columns, values, counts, 0.5)
  assert ease.popularity_scaled(columns, values, counts, 0.0) is values
  books = np.array([[3, 5, 0], [12, 1, 2]])
  got = ease.scores(columns, scaled, books, 12).numpy()
  plain = ease.scores(columns, values, books, 12).numpy()
  factor = np.maximum(counts, 1.0) ** -0.5
  np.testing.assert_allclose(got, plain * factor[None, :], atol=1e-6)
  assert got[0, 1] == pytest.approx(plain[0, 1]) and plain[0, 1] != 0


def test_sparse_rows_keep_the_largest_magnitudes():
  weights = np.array([[0.0, -3.0, 1.0, 0.5],
                      [2.0, 0.0, -0.1, 0.2],
                      [0.3, 0.4, 0.0, -0.9],
                      [1.0, 1.0, 1.0, 0.0]], np.float32)
  columns, values = ease.sparse_rows(weights, 2)
  assert columns.shape == values.shape == (5, 2)
  assert not columns[0].any() and not values[0].any()
  kept = {j: dict(zip(columns[j + 1].tolist(), values[j + 1].tolist()))
          for j in range(3)}
  assert kept[0] == {2: -3.0, 3: 1.0}
  assert kept[1] == pytest.approx({1: 2.0, 4: 0.2})
  assert kept[2] == pytest.approx({2: 0.4, 4: -0.9})


def test_books_beyond_the_tables_score_nothing_and_count_nothing():
  users, items = _pairs(2)
  columns, values = ease.sparse_rows(ease.fit(users, items, 12, 3.0), 5)
  # A corpus grown to 15 books (a catalogue's additions): they neither
  # vote nor get votes, and the padding column stays 0.
  books = tf.constant([[13, 2, 15], [14, 0, 0]], tf.int64)
  got = ease.scores(columns, values, books, 15).numpy()
  alone = ease.scores(columns, values, tf.constant([[2]], tf.int64),
                      15).numpy()
  np.testing.assert_allclose(got[0], alone[0], atol=1e-6)
  assert not got[1].any()
  assert not got[:, 0].any() and not got[:, 13:].any()


def test_the_cap_names_the_flag():
  with pytest.raises(ease.TooManyItemsError, match="--ease_max_items"):
    ease.check_size(101, 100, "--ease_max_items")
  ease.check_size(100, 100, "--ease_max_items")


def _dense(columns, values, n):
  """B (0-based) from `sparse_rows`-style tables."""
  out = np.zeros((n + 1, n + 1))
  np.add.at(out, (np.repeat(np.arange(n + 1), columns.shape[1]),
                  columns.ravel()), values.ravel())
  return out[1:, 1:]


def test_neighbourhoods_of_every_other_book_are_exact_ease(monkeypatch):
  # 40 users reading 8 of 10 books: every pair of books co-occurs, so each
  # book's neighbourhood is all the others.
  users, items = _pairs(4, users=40, items=10, per_user=8)
  assert (ease.gram(users, items, 10) > 0).all()
  # Each chunk of X^T X rows stays within the bound (one book's row may
  # pass it) and holds at most bound / N books.
  chunks = []
  gram_rows = ease._gram_rows  # pylint: disable=protected-access

  def checked(x, x_rows, lo, hi):
    rows = gram_rows(x, x_rows, lo, hi)
    chunks.append(hi - lo)
    assert hi - lo == 1 or rows.nnz <= bound
    assert hi - lo <= max(1, bound // 9)
    return rows

  monkeypatch.setattr(ease, "_gram_rows", checked)
  # The default bound takes all books in one chunk and block; 1000 takes
  # a few books per chunk of X^T X rows; a tiny one, one book per chunk
  # and block, its neighbourhood counted by a sparse product.
  for bound in (2 ** 23, 1000, 150):
    chunks.clear()
    for lam, (columns, values) in zip(
        (7.0, 2.0), ease.neighbourhood_rows(users, items, 10, (7.0, 2.0), 9,
                                            10, block_entries=bound)):
      np.testing.assert_allclose(_dense(columns, values, 10),
                                 ease.fit(users, items, 10, lam), atol=1e-5)
    assert sum(chunks) == 10 and len(chunks) == {2 ** 23: 1, 1000: 3,
                                                 150: 10}[bound]


def test_a_neighbourhood_is_a_ridge_on_the_most_co_occurring_books():
  users, items = _pairs(5, users=60, items=30, per_user=5)
  gram = ease.gram(users, items, 30).astype(np.float64)
  n, k = 30, 4
  # Each lambda is solved on the same neighbourhoods.
  tables = ease.neighbourhood_rows(users, items, 30, (3.0, 0.5), k, 30,
                                   block_entries=60)
  for lam, (columns, values) in zip((3.0, 0.5), tables):
    expected = np.zeros((n, n))
    for j in range(n):
      others = [i for i in range(n) if i != j and gram[i, j] > 0]
      # The most co-occurrences first, ties to the smaller index.
      s = sorted(others, key=lambda i: (-gram[i, j], i))[:k]
      a = gram[np.ix_(s, s)] + lam * np.eye(len(s))
      expected[s, j] = np.linalg.solve(a, gram[s, j])
    np.testing.assert_allclose(_dense(columns, values, n), expected,
                               atol=1e-5)
  # top_k keeps each book's weights of the largest magnitude (the last
  # lambda's).
  [(short_columns, short_values)] = ease.neighbourhood_rows(
      users, items, 30, [0.5], k, 2)
  assert short_columns.shape == (31, 2) and not short_columns[0].any()
  for j in range(n):
    row = expected[j]
    kept = dict(zip(short_columns[j + 1].tolist(), short_values[j + 1]))
    kept.pop(0, None)
    assert len(kept) == min(2, np.count_nonzero(row))
    cut = np.sort(np.abs(row))[::-1][len(kept) - 1] if kept else 0.0
    for c, v in kept.items():
      assert v == pytest.approx(row[c - 1], abs=1e-5)
      assert abs(v) >= cut - 1e-5


def test_neighbourhood_grams_split_and_sparse_paths_agree():
  users, items = _pairs(6, users=50, items=20, per_user=6)
  reads = ease._reads(users, items, 20)  # pylint: disable=protected-access
  gram = ease.gram(users, items, 20)
  index = np.array([[0, 3, 7, -1], [5, 1, 2, 9], [19, -1, -1, -1],
                    [4, 6, 8, 10]])
  expected = np.zeros((4, 4, 4))
  for t, row in enumerate(index):
    real = np.flatnonzero(row >= 0)
    expected[t][np.ix_(real, real)] = gram[np.ix_(row[real], row[real])]
  # One pass, halving blocks, and single targets by the sparse product.
  for max_pairs in (10 ** 9, 60, 1):
    got = ease._neighbourhood_grams(reads, index, max_pairs)  # pylint: disable=protected-access
    np.testing.assert_array_equal(got, expected)


def test_neighbourhood_ease_refuses_no_neighbours_or_no_lambda():
  users, items = _pairs(4, users=10, items=5, per_user=2)
  with pytest.raises(ValueError, match="neighbours >= 1"):
    ease.neighbourhood_rows(users, items, 5, [1.0], 0, 5)
  with pytest.raises(ValueError, match="at least one lambda"):
    ease.neighbourhood_rows(users, items, 5, [], 4, 5)


def test_a_chunk_holds_at_most_bound_over_n_books(monkeypatch):
  # 40 books in a ring, each user reading two neighbours: each X^T X row
  # is tiny (bounded by 4), so the bound / N cap sets the chunks.
  users = np.repeat(np.arange(40), 2)
  items = np.stack([np.arange(40), (np.arange(40) + 1) % 40], 1).ravel()
  whole = list(ease.neighbourhood_rows(users, items, 40, [1.0], 8, 8))
  chunks = []
  gram_rows = ease._gram_rows  # pylint: disable=protected-access
  monkeypatch.setattr(ease, "_gram_rows", lambda x, r, lo, hi: (
      chunks.append(hi - lo), gram_rows(x, r, lo, hi))[1])
  split = list(ease.neighbourhood_rows(users, items, 40, [1.0], 8, 8,
                                       block_entries=64))
  assert chunks == [8] * 5
  for (c0, v0), (c1, v1) in zip(whole, split):
    np.testing.assert_array_equal(c0, c1)
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
