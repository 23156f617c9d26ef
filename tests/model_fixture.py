"""A tiny, deterministic books/users dataset with signal, for model tests.

`write_dataset(directory)` writes `books.csv` and `users.csv` in the input
schema of DESIGN.md (title and categories as JSON-list strings, timestamps
in epoch ms). Each user prefers one of four top-level categories, so a
trained model beats chance; some books have an empty price, empty
categories or an unknown author. `empty_numerics=True` leaves every numeric
cell empty (the dump that used to turn features into NaN).

`ingested(directory)` runs tt_mimic.ingest on such a dataset, and
`prepared(directory)` goes on through runner.prepare, for tests that need
vocabularies, an item table or a model without the training entry point.

Nothing here reads data/ or ../shared.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pandas as pd

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)

# (top-level category, sub-categories); each book gets ["Books", top, sub].
TOPS = (
    ("Mystery, Thriller & Suspense", ("Thrillers", "Police Procedurals")),
    ("Science Fiction & Fantasy", ("Space Opera", "Epic Fantasy")),
    ("Children's Books", ("Animals", "Fairy Tales")),
    ("History", ("Ancient", "Military")),
)
_WORDS = {
    0: ("murder", "night", "detective", "shadow", "case"),
    1: ("star", "dragon", "galaxy", "sword", "empire"),
    2: ("bunny", "little", "bear", "friends", "picnic"),
    3: ("war", "rome", "empire", "kings", "century"),
}
_AUTHORS = ("Ann Author", "Bob Writer", "Cy Scribe", "Di Novelist",
            "Unknown", "")
BASE_MS = 1_600_000_000_000


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Paths of a written dataset and what was written.

  Attributes:
    books_csv, users_csv: file paths.
    books: the books frame as written (all strings).
    events: the events frame as written (parent_asin, userId, timestamp).
    book_top: [n_items] index into TOPS of each book (-1 = no category).
    user_top: [n_users] preferred TOPS index of each user.
  """
  books_csv: str
  users_csv: str
  books: pd.DataFrame
  events: pd.DataFrame
  book_top: np.ndarray
  user_top: np.ndarray


def write_dataset(directory, n_users: int = 240, n_items: int = 120,
                  events_per_user: int = 8, preference: float = 0.85,
                  empty_numerics: bool = False, seed: int = 0) -> Dataset:
  """Writes books.csv and users.csv into `directory` and returns a Dataset.

  Args:
    directory: an existing directory.
    n_users: users `U0000`, `U0001`, ...; user u prefers TOPS[u % 4].
    n_items: books `B00000`, ...; book i is in TOPS[i % 4], except every
      13th book, which has no category (`[]`).
    events_per_user: distinct books per user, with distinct timestamps.
    preference: share of a user's events drawn from the preferred category.
    empty_numerics: leave average_rating, rating_number and price empty
      for every book.
    seed: NumPy RNG seed; equal arguments write equal bytes.
  """
  rng = np.random.default_rng(seed)
  asins = np.array([f"B{i:05d}" for i in range(n_items)])
  book_top = np.array([-1 if i % 13 == 12 else i % 4 for i in range(n_items)])
  titles, categories = [], []
  for i, top in enumerate(book_top):
    words = _WORDS[top if top >= 0 else i % 4]
    title = " ".join(rng.choice(words, 2, replace=False)).title()
    titles.append(json.dumps([f"{title}, Vol. {i}"]))
    if top < 0:
      categories.append("[]")
    else:
      name, subs = TOPS[top]
      categories.append(json.dumps(["Books", name, subs[i % 2]]))
  if empty_numerics:
    rating = number = price = [""] * n_items
  else:
    rating = [f"{x:.1f}" for x in rng.uniform(1, 5, n_items)]
    number = [str(x) for x in rng.integers(0, 2000, n_items)]
    price = ["" if i % 5 == 4 else f"{x:.2f}"
             for i, x in enumerate(rng.uniform(1, 40, n_items))]
  books = pd.DataFrame({
      "parent_asin": asins, "title": titles,
      "author": [_AUTHORS[i % len(_AUTHORS)] for i in range(n_items)],
      "average_rating": rating, "rating_number": number, "price": price,
      "categories": categories})
  # Popularity inside a category falls off, so popularity is a fair baseline.
  by_top = {t: np.flatnonzero(book_top == t) for t in range(len(TOPS))}
  user_top = np.arange(n_users) % len(TOPS)
  rows = []
  for u in range(n_users):
    preferred = by_top[user_top[u]]
    weights = np.ones(n_items) * (1 - preference) / n_items
    weights[preferred] += preference * (
        1.0 / np.arange(1, len(preferred) + 1)) / (
            1.0 / np.arange(1, len(preferred) + 1)).sum()
    picks = rng.choice(n_items, size=events_per_user, replace=False,
                       p=weights / weights.sum())
    start = BASE_MS + int(rng.integers(0, 10**6)) * 1000
    for j, b in enumerate(picks):
      rows.append((asins[b], f"U{u:04d}", start + j * 3_600_000))
  events = pd.DataFrame(rows, columns=["parent_asin", "userId", "timestamp"])
  events = events.iloc[rng.permutation(len(events))].reset_index(drop=True)
  books_csv = os.path.join(str(directory), "books.csv")
  users_csv = os.path.join(str(directory), "users.csv")
  books.to_csv(books_csv, index=False)
  events.to_csv(users_csv, index=False)
  return Dataset(books_csv, users_csv, books, events, book_top, user_top)


def ingest_config(dataset: Dataset, **overrides):
  """IngestConfig for a written dataset: no caps, 2-core unless overridden."""
  from tt_mimic.data import ingest  # pylint: disable=g-import-not-at-top
  params = dict(books_csv=dataset.books_csv, users_csv=dataset.users_csv,
                books_limit=0, interactions_limit=0, min_user_interactions=2,
                min_item_interactions=2)
  params.update(overrides)
  return ingest.IngestConfig(**params)


def ingested(directory, **dataset_kwargs):
  """Writes a dataset into `directory` and runs ingest on it."""
  from tt_mimic.data import ingest  # pylint: disable=g-import-not-at-top
  return ingest.run(ingest_config(write_dataset(directory, **dataset_kwargs)))


def prepared(directory, feature_config=None, train_config=None,
             **dataset_kwargs):
  """runner.prepare on a freshly written and ingested dataset."""
  from tt_mimic.data import features  # pylint: disable=g-import-not-at-top
  from tt_mimic.training import pipeline as runner  # pylint: disable=g-import-not-at-top
  feature_config = feature_config or features.FeatureConfig(
      title_length=6, history_length=5)
  train_config = train_config or runner.TrainConfig(
      batch_size=64, epochs=1, eval_max_users=100, verbose=0)
  return runner.prepare(ingested(directory, **dataset_kwargs), feature_config,
                        train_config)


def train_flags(dataset: Dataset, model_dir: str, **overrides) -> dict:
  """Flag values of a tiny `tt-mimic train` run, as Python values.

  Suitable for `flagsaver.flagsaver(**train_flags(...))`; `as_argv` turns
  them into command-line arguments.
  """
  values = dict(
      books_csv=dataset.books_csv, users_csv=dataset.users_csv,
      model_dir=str(model_dir), books_limit=0, interactions_limit=0,
      min_user_interactions=2, min_item_interactions=2, embedding_dim=8,
      output_dim=8, hidden_units=["16"], history_length=5, title_length=6,
      epochs=2, batch_size=64, eval_max_users=200, recommend_k=0,
      export=False, verbose=0, patience=2,
      variants=["popularity", "two_tower", "dat_no_cal", "dat"])
  values.update(overrides)
  return values


def as_argv(values: dict) -> list[str]:
  """`train_flags` values -> ["--name=value", ...] (bools as --[no]name)."""
  out = []
  for name, value in values.items():
    if isinstance(value, bool):
      out.append(f"--{name}" if value else f"--no{name}")
    elif isinstance(value, (list, tuple)):
      out.append(f"--{name}={','.join(map(str, value))}")
    else:
      out.append(f"--{name}={value}")
  return out
