"""The tests' one dataset generator, and the helpers built on it.

`write_dataset(directory, size=..., ...)` writes `books.csv` and `users.csv`
in the input schema of DESIGN.md (title and categories as JSON lists,
timestamps in epoch ms) and returns a `TinyDataset` with the paths, the
frames written and the genre of every book and user. Its parameters:

  size: a preset of the sizes below (`SIZES`): "tiny" (12 users read 5 of
    10 books at random: ingest and data tests), "small" (240 users, 120
    books in 4 genres, 85% of a user's books drawn from their genre: a
    model learns in an epoch) or "serving" (320 users, 360 books in 6 genres, popularity skew:
    the served run).
  n_users, n_items, n_genres, events_per_user, preference, popularity:
    override the preset (see `write_dataset`).
  seed: NumPy seed; equal arguments write equal bytes.
  ties: timestamps from 3 values only, so equal times occur.
  suffix: ".csv" or ".csv.gz".
  empty_numerics: every average_rating, rating_number and price is empty.
  dirt: quotes in titles, "Unknown" and empty authors, empty categories
    and empty prices in some rows (on by default).

Every dataset is clean where ingest would drop rows: events name known
books, a user reads a book at most once, every field parses. Book i is in
genre i % n_genres and is `G<genre>B<rank>`, rank 0 the most popular of its
genre (and the one with most ratings); each genre has its own category
path, title words and authors; user u prefers genre u % n_genres. With
"tiny" sizes the random draws are those of the former tests/conftest.py
generator (the same events, in the same order), so the ingest tests see
the data they were written for.

Also here: `ingested` and `prepared` (ingest, then pipeline.prepare, on a
fresh dataset), the flags of a tiny `tt-mimic train` run (`train_flags`,
`as_argv`, `SERVING_FLAGS`), `write_new_books`, the catalog's input, and
`write_rows`, which writes rows of text or raw bytes as a CSV (for the
bad-input tests: undecodable bytes, huge fields, ragged rows, truncated
gzip). Nothing here reads data/ or ../shared.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import os

import numpy as np
import pandas as pd

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
from tt_mimic.config import FeatureConfig
from tt_mimic.config import IngestConfig
from tt_mimic.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Genre:
  top: str  # top-level category
  subs: tuple[str, ...]  # sub-categories, alternating over the books
  words: tuple[str, ...]  # title words


GENRES = (
    Genre("Mystery, Thriller & Suspense", ("Thrillers", "Police Procedurals"),
          ("murder", "detective", "shadow", "alibi", "clue", "night")),
    Genre("Science Fiction & Fantasy", ("Space Opera", "Epic Fantasy"),
          ("star", "galaxy", "dragon", "empire", "robot", "void")),
    Genre("Children's Books", ("Animals", "Fairy Tales"),
          ("bunny", "puppy", "farm", "little", "bear", "giggle")),
    Genre("History", ("Ancient", "Military"),
          ("rome", "pharaoh", "war", "chronicle", "kings", "century")),
    Genre("Romance", ("Historical", "Contemporary"),
          ("heart", "duke", "kiss", "summer", "wedding", "letters")),
    Genre("Cookbooks, Food & Wine", ("Baking", "Regional"),
          ("bread", "cake", "kitchen", "flour", "sweet", "oven")),
)
AUTHORS_PER_GENRE = 5
BASE_MS = 1_600_000_000_000
STEP_MS = 60_000

SIZES = {
    "tiny": dict(n_users=12, n_items=10, n_genres=4, events_per_user=5,
                 preference=0.0, popularity=0.0),
    "small": dict(n_users=240, n_items=120, n_genres=4, events_per_user=8,
                  preference=0.85, popularity=1.0),
    "serving": dict(n_users=320, n_items=360, n_genres=6,
                    events_per_user=(6, 16), preference=0.85,
                    popularity=0.8),
}


def asin(genre: int, rank: int) -> str:
  """The parent_asin of the book of `genre` with popularity rank `rank`."""
  return f"G{genre}B{rank:03d}"


def user_id(u: int) -> str:
  return f"U{u:04d}"


def author(genre: int, k: int) -> str:
  return f"Author {genre}-{k}"


@dataclasses.dataclass(frozen=True)
class TinyDataset:
  """A written dataset.

  Attributes:
    books_csv: path of books.csv (or books.csv.gz).
    users_csv: path of users.csv (or users.csv.gz).
    books: the books frame as written (all columns are strings).
    events: the events frame as written, in file order: parent_asin,
      userId (strings), timestamp (int64 ms).
    book_genre: [n_items] GENRES index of each book (in books' order).
    user_genre: [n_users] preferred GENRES index of user `user_id(u)`.
  """
  books_csv: str
  users_csv: str
  books: pd.DataFrame
  events: pd.DataFrame
  book_genre: np.ndarray
  user_genre: np.ndarray

  def config(self, **overrides) -> IngestConfig:
    """An `IngestConfig` for these files: no caps, k-core 1/1 unless given."""
    params = dict(books_csv=self.books_csv, users_csv=self.users_csv,
                  books_limit=0, interactions_limit=0,
                  min_user_interactions=1, min_item_interactions=1)
    params.update(overrides)
    return IngestConfig(**params)


def write_dataset(directory, size: str = "tiny", *, seed: int = 0,
                  ties: bool = False, suffix: str = ".csv",
                  empty_numerics: bool = False, dirt: bool = True,
                  **sizes) -> TinyDataset:
  """Writes books and users files into `directory`; see the module doc.

  Args:
    directory: an existing directory (str or pathlib.Path).
    size: "tiny", "small" or "serving": the defaults of `sizes`.
    seed: NumPy RNG seed; the same arguments always write the same bytes.
    ties: if False every timestamp is distinct; if True they take one of 3
      values (60 s apart), so equal timestamps occur within users.
    suffix: ".csv" or ".csv.gz" (gzip-compressed).
    empty_numerics: leave average_rating, rating_number and price empty
      for every book.
    dirt: quotes in every other title; authors "Unknown" and "" (books
      i % 6 == 4, 5); categories "[]" (i % 9 == 8); price "" (i % 5 == 4).
    **sizes: overrides of the preset:
      n_users: users `U0000`, `U0001`, ...
      n_items: books, interleaved over the genres.
      n_genres: how many of GENRES are used (at most 6).
      events_per_user: distinct books per user (capped at n_items), or a
        (low, high) pair: each user's count is drawn from [low, high).
      preference: share of a user's events drawn from their genre.
      popularity: the exponent of the 1 / (rank + 1) popularity of the
        books within a genre (0: all equally popular).

  Returns:
    A `TinyDataset` (paths as str, and what was written).
  """
  unknown = set(sizes) - set(SIZES["tiny"])
  if unknown:
    raise TypeError(f"unknown write_dataset arguments {sorted(unknown)}")
  p = {**SIZES[size], **sizes}
  n_users, n_items, n_genres = p["n_users"], p["n_items"], p["n_genres"]
  rng = np.random.default_rng(seed)

  # The order of the random draws keeps the "tiny" datasets' numbers and
  # events those of the generator that the ingest tests were written for.
  book_genre = np.arange(n_items) % n_genres
  rank = np.arange(n_items) // n_genres
  asins = np.array([asin(g, r) for g, r in zip(book_genre, rank)])
  popular = 1.0 / (rank + 1.0) ** p["popularity"]
  rating = [f"{x:.1f}" for x in rng.uniform(1, 5, n_items)]
  # Popular books have more ratings (a model may learn that, not an id).
  number = [str(x) for x in np.round(500 * popular).astype(int)
            + rng.integers(0, 500, n_items) // 25]
  price = ["" if dirt and i % 5 == 4 else f"{x:.2f}"
           for i, x in enumerate(rng.uniform(1, 30, n_items))]
  if empty_numerics:
    rating = number = price = [""] * n_items

  user_genre = np.arange(n_users) % n_genres
  uniform = p["preference"] == 0 and p["popularity"] == 0
  per_user = p["events_per_user"]
  if isinstance(per_user, tuple):
    counts = rng.integers(per_user[0], per_user[1], size=n_users)
  else:
    counts = np.full(n_users, per_user)
  rows = []
  for u in range(n_users):
    own = np.where(book_genre == user_genre[u], popular, 0.0)
    weights = ((1 - p["preference"]) * popular / popular.sum()
               + p["preference"] * own / own.sum())
    picks = rng.choice(n_items, size=min(int(counts[u]), n_items),
                       replace=False,
                       p=None if uniform else weights / weights.sum())
    rows += [(asins[b], user_id(u)) for b in picks]
  n = len(rows)
  if ties:
    ts = BASE_MS + rng.integers(0, 3, size=n) * STEP_MS
  else:
    ts = BASE_MS + rng.permutation(n) * STEP_MS
  events = pd.DataFrame(rows, columns=["parent_asin", "userId"])
  events["timestamp"] = ts.astype(np.int64)
  events = events.iloc[rng.permutation(n)].reset_index(drop=True)

  titles, authors, categories = [], [], []
  for i, (g, r) in enumerate(zip(book_genre, rank)):
    genre = GENRES[g]
    first, second = rng.choice(genre.words, size=2, replace=False)
    first = f'"{first.title()}"' if dirt and i % 2 else first.title()
    titles.append(json.dumps([f"The {first} of the {second.title()}, "
                              f"part {r}"]))
    if dirt and i % 6 == 4:
      authors.append("Unknown")
    elif dirt and i % 6 == 5:
      authors.append("")
    else:
      authors.append(author(g, r % AUTHORS_PER_GENRE))
    if dirt and i % 9 == 8:
      categories.append("[]")
    else:
      categories.append(json.dumps(
          ["Books", genre.top, genre.subs[r % len(genre.subs)]]))
  books = pd.DataFrame({
      "parent_asin": asins, "title": titles, "author": authors,
      "average_rating": rating, "rating_number": number, "price": price,
      "categories": categories})

  books_csv = os.path.join(str(directory), "books" + suffix)
  users_csv = os.path.join(str(directory), "users" + suffix)
  books.to_csv(books_csv, index=False)
  events.to_csv(users_csv, index=False)
  return TinyDataset(books_csv, users_csv, books, events, book_genre,
                     user_genre)


# ------------------------------------------- ingest and prepare a dataset


def ingested(directory, size: str = "small", **dataset_kwargs):
  """Writes a dataset into `directory` and ingests it (k-core 2/2)."""
  from tt_mimic.data import ingest  # pylint: disable=g-import-not-at-top
  dataset = write_dataset(directory, size, **dataset_kwargs)
  return ingest.run(dataset.config(min_user_interactions=2,
                                   min_item_interactions=2))


def prepared(directory, feature_config=None, train_config=None,
             **dataset_kwargs):
  """pipeline.prepare on a freshly written and ingested "small" dataset."""
  from tt_mimic.training import pipeline  # pylint: disable=g-import-not-at-top
  feature_config = feature_config or FeatureConfig(title_length=6,
                                                   history_length=5)
  train_config = train_config or TrainConfig(batch_size=64, epochs=1,
                                             eval_max_users=100, verbose=0)
  return pipeline.prepare(ingested(directory, **dataset_kwargs),
                          feature_config, train_config)


# ------------------------------------------------------- tiny train runs


def train_flags(dataset: TinyDataset, model_dir, **overrides) -> dict:
  """Flag values of a tiny `tt-mimic train` run, as Python values.

  Suitable for `flagsaver.flagsaver(**train_flags(...))`; `as_argv` turns
  them into command-line arguments. No EASE blend unless asked for
  (`ease_weights`): tests/training/test_blend_run.py tests it.
  """
  values = dict(
      books_csv=dataset.books_csv, users_csv=dataset.users_csv,
      model_dir=str(model_dir), books_limit=0, interactions_limit=0,
      min_user_interactions=2, min_item_interactions=2, embedding_dim=8,
      output_dim=8, hidden_units=["16"], history_length=5, title_length=6,
      epochs=2, batch_size=64, eval_max_users=200, recommend_k=0,
      export=False, verbose=0, patience=2, refit=False, ease_weights=[],
      variants=["popularity", "two_tower", "dat_no_cal", "dat"])
  values.update(overrides)
  return values


# The served run (on a "serving" dataset): a small DAT model that still
# learns the genres in a few seconds (new books then rank high for some
# users), exported with k=20 to keep the indexes small.
SERVING_FLAGS = dict(
    epochs=5, learning_rate=0.01, variants=["dat"], batch_size=128,
    history_length=10, title_length=12, recommend_k=5, export=True,
    export_k=20, max_exclusions=30, category_top_k=50, author_top_k=50,
    title_max_tokens=500, patience=0,
    # One query vector and a free user-id embedding: with several vectors,
    # or without the embedding (the defaults), the catalog's metadata-only
    # books rank by genre less well on this data (one genre per user; README
    # "Flags"). The export of the defaults is tested in test_export.py.
    interests=1, user_id_embedding=True)


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


# ------------------------------------------------- the catalog's new books

NEW_GENRE = 1  # new books are science fiction


def write_new_books(directory) -> tuple[str, list[str]]:
  """A books CSV for the catalog: 4 new books, 1 known, 2 bad rows.

  The first three new books are science fiction, by authors and with title
  words of that genre; the fourth has a top-level category ("Poetry") that
  no model has seen. The known book is `asin(0, 0)`, the most popular of
  its genre (in the corpus of a "serving" run).

  Returns:
    The path and the new books' parent_asins.
  """
  genre = GENRES[NEW_GENRE]
  words = genre.words
  new = [f"NEW{i:03d}" for i in range(3)]
  rows = [{
      "parent_asin": a,
      "title": json.dumps([f"The {words[i].title()} of the "
                           f"{words[i + 1].title()}, part {i}"]),
      "author": author(NEW_GENRE, i),
      "average_rating": "4.5",
      "rating_number": "120",
      "price": "9.99" if i else "not a price",
      "categories": json.dumps(["Books", genre.top, genre.subs[0]]),
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
  path = os.path.join(str(directory), "new_books.csv")
  pd.DataFrame(rows).to_csv(path, index=False)
  return path, new


# ------------------------------------------------------ raw CSV for bad input


def write_rows(path, header, rows, compress: bool = False,
               truncate: int = 0) -> str:
  """Writes a CSV whose cells may be raw bytes, quoted as the csv module does.

  Args:
    path: the file to write.
    header: the column names.
    rows: lists of cells, each a str or bytes (written as is, so invalid
      UTF-8 survives); rows may have any number of cells.
    compress: gzip the file.
    truncate: drop this many bytes from the end of the (compressed) file.

  Returns:
    The path, as a str.
  """
  text = io.StringIO()
  writer = csv.writer(text)  # rows end in \r\n; cells with \r or \n quoted
  writer.writerow(header)
  for row in rows:
    writer.writerow([c.decode("utf-8", "surrogateescape")
                     if isinstance(c, bytes) else c for c in row])
  data = text.getvalue().encode("utf-8", "surrogateescape")
  if compress:
    data = gzip.compress(data, mtime=0)
  with open(path, "wb") as f:
    f.write(data[:len(data) - truncate])
  return str(path)


# ------------------------------------------- the Amazon release's JSONL


def write_jsonl(dataset: TinyDataset, directory, compress: bool = False,
                rating=None) -> tuple[str, str]:
  """Writes `dataset` as the Amazon Reviews 2023 release's two JSONL files.

  `meta_Books.jsonl` holds the books with the release's types (title a
  string, author {"name": ...} or null when empty, numbers as numbers,
  price "$x.xx" or null, categories a list) and fields the ingest ignores;
  `Books.jsonl` one review per event, with the review fields. Ingested,
  they give what `dataset`'s CSVs give.

  Args:
    dataset: a written `TinyDataset`.
    directory: where to write.
    compress: gzip both files (names end in .jsonl.gz).
    rating: None (5.0 for every review) or a function of the event's row
      number giving its rating (None: no rating field).

  Returns:
    (meta path, reviews path), as str.
  """
  def number(text, kind):
    return kind(text) if text else None

  meta, reviews = [], []
  for r in dataset.books.itertuples():
    meta.append({
        "main_category": "Books", "title": json.loads(r.title)[0],
        "subtitle": "Paperback", "author": ({"name": r.author, "about": []}
                                            if r.author else None),
        "average_rating": number(r.average_rating, float),
        "rating_number": number(r.rating_number, int),
        "features": [], "description": [],
        "price": f"${r.price}" if r.price else None,
        "images": [], "videos": [], "store": None,
        "categories": json.loads(r.categories),
        "details": {"Language": "English"}, "parent_asin": r.parent_asin,
        "bought_together": None})
  for i, r in enumerate(dataset.events.itertuples()):
    review = {"title": "A review", "text": "Words, \"quoted\".",
              "images": [], "asin": r.parent_asin,
              "parent_asin": r.parent_asin, "user_id": r.userId,
              "timestamp": int(r.timestamp), "helpful_vote": i % 3,
              "verified_purchase": bool(i % 2)}
    value = 5.0 if rating is None else rating(i)
    if value is not None:
      review = {"rating": value, **review}
    reviews.append(review)
  paths = []
  for name, records in (("meta_Books", meta), ("Books", reviews)):
    data = "".join(json.dumps(x) + "\n" for x in records).encode()
    path = os.path.join(str(directory), name + ".jsonl")
    if compress:
      data, path = gzip.compress(data, mtime=0), path + ".gz"
    with open(path, "wb") as f:
      f.write(data)
    paths.append(path)
  return paths[0], paths[1]
