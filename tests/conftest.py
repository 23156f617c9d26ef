"""Shared test helpers: a tiny, deterministic books/users CSV dataset.

`write_dataset(directory, ...)` writes `books.csv` and `users.csv` in the
input schema of DESIGN.md (title and categories as JSON lists, timestamps in
epoch ms) and returns a `TinyDataset` with the paths and the frames written.
The `dataset_writer` fixture binds it to the test's `tmp_path`; the
`tiny_dataset` fixture is one default dataset. Other test modules can use the
fixtures, or `from conftest import write_dataset`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pytest

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)

_AUTHORS = ("Ann Author", "Bob Writer", "Unknown", "", "Geoffrey Chaucer")
_CATEGORIES = (("Books", "Literature & Fiction", "History & Criticism"),
               ("Books", "Mystery, Thriller & Suspense"),
               ("Books", "Children's Books"), ())


@dataclasses.dataclass(frozen=True)
class TinyDataset:
  """A written dataset.

  Attributes:
    books_csv: path of books.csv (or books.csv.gz).
    users_csv: path of users.csv (or users.csv.gz).
    books: the books frame as written (all columns are strings).
    events: the events frame as written, in file order: parent_asin,
      userId (strings), timestamp (int64 ms).
  """
  books_csv: str
  users_csv: str
  books: pd.DataFrame
  events: pd.DataFrame

  def config(self, **overrides):
    """An `IngestConfig` for these files: no caps, k-core 1/1 unless given."""
    from tt_mimic.data import ingest  # pylint: disable=g-import-not-at-top
    params = dict(books_csv=self.books_csv, users_csv=self.users_csv,
                  books_limit=0, interactions_limit=0,
                  min_user_interactions=1, min_item_interactions=1)
    params.update(overrides)
    return ingest.IngestConfig(**params)


def write_dataset(directory, n_users: int = 12, n_items: int = 10,
                  events_per_user: int = 5, seed: int = 0,
                  ties: bool = False, suffix: str = ".csv") -> TinyDataset:
  """Writes a tiny books.csv / users.csv pair into `directory`.

  Args:
    directory: existing directory (str or pathlib.Path).
    n_users: users `U000`, `U001`, ...
    n_items: books `B0000`, `B0001`, ...; titles hold commas and quotes.
    events_per_user: distinct books per user (capped at n_items); no
      duplicate (user, book) pairs and every event's book is in books.csv.
    seed: NumPy RNG seed; the same arguments always write the same bytes.
    ties: if False every timestamp in users.csv is distinct; if True they
      come from 3 values per user, so equal timestamps occur.
    suffix: ".csv" or ".csv.gz".

  Returns:
    A `TinyDataset` (paths as str, and the frames written).
  """
  rng = np.random.default_rng(seed)
  asins = [f"B{i:04d}" for i in range(n_items)]
  books = pd.DataFrame({
      "parent_asin": asins,
      "title": [json.dumps([f'Book {i}, the "{("red", "blue")[i % 2]}" one'])
                for i in range(n_items)],
      "author": [_AUTHORS[i % len(_AUTHORS)] for i in range(n_items)],
      "average_rating": [f"{x:.1f}" for x in rng.uniform(1, 5, n_items)],
      "rating_number": [str(x) for x in rng.integers(0, 500, n_items)],
      "price": ["" if i % 4 == 3 else f"{x:.2f}"
                for i, x in enumerate(rng.uniform(1, 30, n_items))],
      "categories": [json.dumps(list(_CATEGORIES[i % len(_CATEGORIES)]))
                     for i in range(n_items)],
  })
  per_user = min(events_per_user, n_items)
  rows = []
  for u in range(n_users):
    for b in rng.choice(n_items, size=per_user, replace=False):
      rows.append((asins[b], f"U{u:03d}"))
  n = len(rows)
  base = 1_600_000_000_000
  if ties:
    ts = base + rng.integers(0, 3, size=n) * 60_000
  else:
    ts = base + rng.permutation(n) * 60_000
  events = pd.DataFrame(rows, columns=["parent_asin", "userId"])
  events["timestamp"] = ts.astype(np.int64)
  events = events.iloc[rng.permutation(n)].reset_index(drop=True)
  books_csv = os.path.join(str(directory), "books" + suffix)
  users_csv = os.path.join(str(directory), "users" + suffix)
  books.to_csv(books_csv, index=False)
  events.to_csv(users_csv, index=False)
  return TinyDataset(books_csv=books_csv, users_csv=users_csv, books=books,
                     events=events)


@pytest.fixture
def dataset_writer(tmp_path):
  """`write_dataset` writing into a fresh sub-directory of `tmp_path`."""
  counter = [0]

  def write(**kwargs) -> TinyDataset:
    counter[0] += 1
    directory = tmp_path / f"dataset{counter[0]}"
    directory.mkdir()
    return write_dataset(directory, **kwargs)

  return write


@pytest.fixture
def tiny_dataset(dataset_writer) -> TinyDataset:
  """The default tiny dataset (12 users x 5 of 10 books, distinct times)."""
  return dataset_writer()


def pytest_collection_modifyitems(config, items):
  """Drops tf.test.TestCase's inherited `test_session` (a helper, not a test)."""
  del config
  items[:] = [item for item in items if item.name != "test_session"]
