"""A tiny trained run for the serving tests: data, training, new books.

`write_books_dataset(directory)` writes a deterministic books.csv /
users.csv pair with genre structure (each genre has its own category path,
authors and title words; each user mostly reads one genre, popular books
more often), so that one epoch of a tiny model learns something.
`train_run(model_dir, books_csv, users_csv)` trains and exports the DAT
variant through `tt_mimic.commands.train.main` with tiny sizes. `write_new_books`
writes a books CSV for `tt_mimic.catalog`: new books, one already in the
corpus and rows the parser must skip.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)

GENRES = (
    ("Mystery, Thriller & Suspense", "Crime",
     ("murder", "detective", "shadow", "alibi", "clue", "night")),
    ("Science Fiction & Fantasy", "Space Opera",
     ("star", "galaxy", "dragon", "empire", "robot", "void")),
    ("Romance", "Historical",
     ("heart", "duke", "kiss", "summer", "wedding", "letters")),
    ("Children's Books", "Animals",
     ("bunny", "puppy", "farm", "little", "bear", "giggle")),
    ("History", "Ancient",
     ("rome", "empire", "pharaoh", "war", "chronicle", "kings")),
    ("Cookbooks, Food & Wine", "Baking",
     ("bread", "cake", "kitchen", "flour", "sweet", "oven")),
)
ITEMS_PER_GENRE = 60
AUTHORS_PER_GENRE = 5
NUM_USERS = 320
SEED = 1234

# A small model that still learns the genres in a few seconds (new books
# then rank high for some users); k=20 keeps the indexes small.
TRAIN_FLAGS = dict(
    epochs=5, learning_rate=0.01, embedding_dim=8, output_dim=8,
    hidden_units=["16"], variants=["dat"], min_user_interactions=2,
    min_item_interactions=2,
    eval_max_users=200, recommend_k=5, verbose=0, batch_size=128,
    history_length=10, export_k=20, max_exclusions=30, books_limit=0,
    interactions_limit=0, category_top_k=50, author_top_k=50,
    title_max_tokens=500, patience=0)


def asin(genre: int, i: int) -> str:
  return f"G{genre}B{i:03d}"


def _title(rng, words, i):
  picked = rng.choice(words, size=2, replace=False)
  return f"The {picked[0].title()} of the {picked[1].title()}, part {i}"


def write_books_dataset(directory: str) -> tuple[str, str, pd.DataFrame]:
  """Writes books.csv and users.csv; returns their paths and the books."""
  rng = np.random.default_rng(SEED)
  rows = []
  for g, (top, sub, words) in enumerate(GENRES):
    for i in range(ITEMS_PER_GENRE):
      rows.append({
          "parent_asin": asin(g, i),
          "title": json.dumps([_title(rng, words, i)]),
          "author": f"Author {g}-{i % AUTHORS_PER_GENRE}",
          "average_rating": f"{rng.uniform(3, 5):.2f}",
          "rating_number": str(int(rng.integers(1, 5000))),
          "price": "" if i % 7 == 0 else f"{rng.uniform(3, 30):.2f}",
          "categories": json.dumps(["Books", top, sub]),
      })
  books = pd.DataFrame(rows)
  zipf = 1.0 / np.arange(1, ITEMS_PER_GENRE + 1) ** 0.8
  zipf /= zipf.sum()
  events = []
  t = 1_600_000_000_000
  for u in range(NUM_USERS):
    genre = u % len(GENRES)
    n = int(rng.integers(6, 16))
    chosen = set()
    while len(chosen) < n:
      g = genre if rng.random() < 0.85 else int(rng.integers(len(GENRES)))
      chosen.add(asin(g, int(rng.choice(ITEMS_PER_GENRE, p=zipf))))
    for a in sorted(chosen):
      t += int(rng.integers(1, 5)) * 60_000
      events.append((a, f"U{u:04d}", t))
  events = pd.DataFrame(events, columns=["parent_asin", "userId", "timestamp"])
  events = events.iloc[rng.permutation(len(events))]
  books_csv = os.path.join(directory, "books.csv")
  users_csv = os.path.join(directory, "users.csv")
  books.to_csv(books_csv, index=False)
  events.to_csv(users_csv, index=False)
  return books_csv, users_csv, books


def train_run(model_dir: str, books_csv: str, users_csv: str) -> str:
  """Trains and exports a tiny DAT run into `model_dir` (in this process).

  Returns:
    What training printed to stdout (the example recommendations).
  """
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  from tt_mimic.commands import train  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  out = io.StringIO()
  with flagsaver.flagsaver(books_csv=books_csv, users_csv=users_csv,
                           model_dir=model_dir, **TRAIN_FLAGS):
    with contextlib.redirect_stdout(out):
      train.main(["train"])
  return out.getvalue()


NEW_GENRE = 1  # new books are science fiction


def write_new_books(directory: str) -> tuple[str, list[str]]:
  """A books CSV for the catalog: 4 new books, 1 known, 2 bad rows.

  The first three new books are science fiction; the fourth has a top-level
  category ("Poetry") that the model has never seen.

  Returns:
    The path and the new books' parent_asins.
  """
  top, sub, words = GENRES[NEW_GENRE]
  new = [f"NEW{i:03d}" for i in range(3)]
  rows = [{
      "parent_asin": a,
      "title": json.dumps([f"The {words[i].title()} of the "
                           f"{words[i + 1].title()}, part {i}"]),
      "author": f"Author {NEW_GENRE}-{i}",
      "average_rating": "4.5",
      "rating_number": "120",
      "price": "9.99" if i else "not a price",
      "categories": json.dumps(["Books", top, sub]),
  } for i, a in enumerate(new)]
  rows.append({"parent_asin": "NEW003",
               "title": json.dumps(["Leaves of Grass"]),
               "author": "Walt Whitman", "average_rating": "4.1",
               "rating_number": "80", "price": "5",
               "categories": json.dumps(["Books", "Poetry", "American"])})
  new.append("NEW003")
  rows.append({  # already in the corpus: skipped
      "parent_asin": asin(0, 0), "title": json.dumps(["Known book"]),
      "author": "Someone", "average_rating": "4", "rating_number": "1",
      "price": "1", "categories": json.dumps(["Books"])})
  rows.append(dict(rows[0]))  # duplicate parent_asin
  rows.append({**rows[1], "parent_asin": "  "})  # missing parent_asin
  path = os.path.join(directory, "new_books.csv")
  pd.DataFrame(rows).to_csv(path, index=False)
  return path, new
