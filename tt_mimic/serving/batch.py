"""Recommendations for many users at once, written to Parquet.

`write_recommendations` asks a `Recommender` for chunks of users
(`Recommender.recommend_batch`) and appends each chunk's rows to one
Parquet file with `pyarrow.parquet.ParquetWriter`, so memory holds one
chunk whatever the number of users. The file has one row per (user, rank):

  userId       str    the user, as given
  rank         int16  1 = best
  parent_asin  str    the book
  score        float32
  source       str    how the user was answered (known user, popularity
                      for an unknown user; see `recommender`)

A user answered with fewer than k books (e.g. one who has read most of the
export's candidates, with seen books excluded) has fewer rows, and one with
none has no row: the summary counts both (`short_users`, `empty_users`), so
no user leaves the file unreported.

It is written as `<path>.tmp` and renamed when complete, so a reader never
sees half a file. Users come from the export (`all_users`: every user it
knows, in its order) or from a text file of ids, one per line
(`read_user_ids`: blank lines skipped, repeats answered once).
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

from absl import logging
import pyarrow as pa
import pyarrow.parquet as pq

from tt_mimic import progress as progress_lib
from tt_mimic.serving import recommender as recommender_lib

SCHEMA = pa.schema([("userId", pa.string()), ("rank", pa.int16()),
                    ("parent_asin", pa.string()), ("score", pa.float32()),
                    ("source", pa.string())])


def all_users(rec: recommender_lib.Recommender) -> list[str]:
  """Every user the export knows (its seen.parquet), in first-seen order."""
  return rec.known_users()


def read_user_ids(path: str) -> Iterator[str]:
  """The user ids of a text file, one per line, each once.

  Raises:
    OSError: the file cannot be read.
  """
  seen = set()
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      user = line.strip()
      if user and user not in seen:
        seen.add(user)
        yield user


def _chunks(users: Iterable[str], size: int) -> Iterator[list[str]]:
  chunk = []
  for user in users:
    chunk.append(user)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def _table(users: list[str], answers) -> pa.Table:
  """One chunk's rows (see the module docstring)."""
  columns = {name: [] for name in SCHEMA.names}
  for user, recs in zip(users, answers):
    for row in recs:
      columns["userId"].append(user)
      columns["rank"].append(row["rank"])
      columns["parent_asin"].append(row["parent_asin"])
      columns["score"].append(row["score"])
      columns["source"].append(recs.source)
  return pa.table(columns, schema=SCHEMA)


def write_recommendations(rec: recommender_lib.Recommender,
                          users: Iterable[str], path: str, k: int = 10,
                          exclude_seen: bool = True, chunk_size: int = 1024,
                          total: int | None = None) -> dict:
  """Writes the top-k books of every user in `users` to a Parquet file.

  Args:
    rec: a loaded Recommender.
    users: user ids (an iterable: it is read one chunk at a time).
    path: the Parquet file to write (its directory is created).
    k: results per user, 1 <= k <= rec.k.
    exclude_seen: leave out the books each user has read.
    chunk_size: users asked for and written at once (one row group each).
    total: the number of users, for the progress lines (optional).

  Returns:
    {"path", "users", "rows", "by_source": {source: users},
     "short_users": users with fewer than k books (including none),
     "empty_users": users with none (absent from the file)}.

  Raises:
    ValueError: bad k or chunk_size.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
  if not 1 <= k <= rec.k:  # before any file is created
    raise ValueError(f"k={k} is out of range: this export returns at most "
                     f"{rec.k} results per user (export_k).")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  partial = path + ".tmp"
  progress = progress_lib.Progress("batch recommendations", total, "users")
  n_users, n_rows, by_source, short, empty = 0, 0, {}, 0, 0
  try:
    with pq.ParquetWriter(partial, SCHEMA) as writer:
      for chunk in _chunks(users, chunk_size):
        answers = rec.recommend_batch(chunk, None, k, exclude_seen)
        table = _table(chunk, answers)
        writer.write_table(table)
        for recs in answers:
          by_source[recs.source] = by_source.get(recs.source, 0) + 1
          short += len(recs) < k
          empty += not recs
        n_users += len(chunk)
        n_rows += table.num_rows
        progress.add(len(chunk))
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  progress.done()
  if short:
    logging.warning("batch recommendations: %d of %d users got fewer than %d "
                    "books (%d got none and have no row in %s).", short,
                    n_users, k, empty, path)
  return {"path": path, "users": n_users, "rows": n_rows,
          "by_source": by_source, "short_users": short, "empty_users": empty}
