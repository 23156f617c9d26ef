"""Adds new books to an exported run without retraining.

  tt-mimic catalog --model_dir=<run> --books_csv=<new books csv> \
      [--update_existing]

The CSV (books.csv schema) is read with ingest's parsing, bad rows are
skipped and counted. Books not yet in the export are embedded from their
metadata alone by the exported `candidate/` tower (their id embedding is the
unknown-book one, as for any book unseen in training), appended to
`items.parquet` and `embeddings.npy`, and both indexes are rebuilt around the
exported `query/` tower (same k and exclusion headroom; ScaNN parameters
picked afresh for the new corpus size, agreement re-measured). With
--update_existing, books already in the export whose metadata changed are
re-embedded in place.

New books can be recommended at once; they do not count as known history
books until the model is retrained (the query tower has no id for them), and
their popularity is zero. A running `tt-mimic serve` must be restarted to
see them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from absl import logging
import numpy as np
import pandas as pd

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tt_mimic.config import ExportConfig
from tt_mimic.config import FeatureConfig
from tt_mimic.config import IngestConfig
from tt_mimic.data import features
from tt_mimic.data import ingest
from tt_mimic.serving import export
from tt_mimic.serving import recommender as recommend

METADATA_COLUMNS = ("title", "author", "categories") + ingest.NUMERIC_COLUMNS
ITEM_COLUMNS = ("parent_asin",) + METADATA_COLUMNS + ("train_count",)
_CHECK_ROWS = 64  # exported books re-embedded to check the candidate tower
_MAX_QUERIES = 1000  # users whose embeddings measure ScaNN against brute force


class CatalogError(RuntimeError):
  """New books that cannot be added, with the reason."""


@dataclasses.dataclass
class CatalogResult:
  """What `add_books` did.

  Attributes:
    books: counts of the CSV (read, kept, dropped by reason) as ingest's
      report, plus the numeric values set missing.
    added: parent_asins appended to the export.
    updated: parent_asins re-embedded in place.
    unchanged: how many CSV books were already in the export as they are
      (or were left alone without --update_existing).
    items: corpus size afterwards.
    index: build_indexes' answer (k, ScaNN parameters, agreement), or {}
      when nothing changed.
  """
  books: dict
  added: list
  updated: list
  unchanged: int
  items: int
  index: dict

  def summary(self) -> str:
    b = self.books
    drops = ", ".join(f"{k}={v}" for k, v in b["dropped"].items() if v)
    invalid = ", ".join(
        f"{column} {sum(counts.values())}" for column, counts
        in b["invalid_values"].items() if sum(counts.values()))
    lines = [f"books CSV: read {b['read']} rows, kept {b['kept']}, skipped "
             f"{sum(b['dropped'].values())} ({drops or 'none'})",
             f"numeric values set missing: {invalid or 'none'}",
             f"added {len(self.added)} new books, updated {len(self.updated)}"
             f", {self.unchanged} already in the export left as they are"]
    if self.index:
      agree = self.index.get("scann_agreement_at_k")
      lines.append(
          f"rebuilt indexes over {self.items} books (k={self.index['k']}"
          + (f", ScaNN top-k agreement with brute force {agree:.4f}"
             if agree is not None else ", no ScaNN") + ")")
    else:
      lines.append(f"nothing to change; the export keeps {self.items} books")
    return "\n".join(lines)


def _same(a, b) -> bool:
  if isinstance(a, (list, tuple, np.ndarray)) or isinstance(
      b, (list, tuple, np.ndarray)):
    return [str(x) for x in a] == [str(x) for x in b]
  if isinstance(a, float) or isinstance(b, float):
    a, b = float(a), float(b)
    return (np.isnan(a) and np.isnan(b)) or a == b
  return str(a) == str(b)


def embed(candidate, books: pd.DataFrame, batch_size: int = 4096) -> np.ndarray:
  """[len(books), dim] embeddings of books through the candidate SavedModel.

  Args:
    candidate: the loaded `candidate/` SavedModel.
    books: parent_asin, title, author, categories (lists), numerics.
    batch_size: books per call.
  """
  raw = features.raw_item_features(books, FeatureConfig())
  fn = candidate.signatures["serving_default"]
  parts = []
  for start in range(0, len(books), batch_size):
    chunk = {name: tf.constant(values[start:start + batch_size])
             for name, values in raw.items()}
    try:
      parts.append(fn(**chunk)["embedding"].numpy())
    except tf.errors.InvalidArgumentError as e:
      lines = [x.strip() for x in e.message.splitlines() if x.strip()]
      reason = next((x for x in lines if "assertion failed" in x),
                    lines[0] if lines else "")
      raise CatalogError("The candidate tower rejected books "
                         f"{start}..{start + len(chunk['title']) - 1}: "
                         f"{reason}") from e
  return np.concatenate(parts).astype(np.float32)


def read_new_books(books_csv: str) -> tuple[pd.DataFrame, dict]:
  """The valid books of a CSV (ingest's parsing) and the counts."""
  report = ingest.Report()
  config = IngestConfig(books_csv=books_csv, users_csv="",
                               books_limit=0)
  books = ingest.read_books(config, report)
  counts = {k: report.data["books"][k] for k in ("read", "kept", "dropped")}
  counts["invalid_values"] = report.data["invalid_values"]
  return books, counts


def _write_atomic(path: str, write) -> None:
  tmp = path + ".tmp"
  write(tmp)
  os.replace(tmp, path)


def add_books(model_dir: str, books_csv: str,
              update_existing: bool = False) -> CatalogResult:
  """Embeds the new books of `books_csv` and rebuilds the run's indexes.

  Args:
    model_dir: a training run directory (or its export directory).
    books_csv: books.csv-schema file of new (or updated) books.
    update_existing: re-embed books already exported whose metadata changed.

  Returns:
    A CatalogResult.

  Raises:
    recommend.ExportError: no usable export.
    ingest.IngestError: the CSV cannot be read.
    CatalogError: the candidate tower does not reproduce the export.
  """
  directory = recommend.export_directory(model_dir)
  with open(os.path.join(directory, "export.json")) as f:
    info = json.load(f)
  items = pd.read_parquet(os.path.join(directory, "items.parquet"))
  items["categories"] = items["categories"].map(
      lambda c: [] if c is None else [str(x) for x in c])
  embeddings = np.load(os.path.join(directory, "embeddings.npy"))
  if len(items) != len(embeddings):
    raise CatalogError(f"items.parquet has {len(items)} rows but "
                       f"embeddings.npy {len(embeddings)}; re-export the run.")
  books, counts = read_new_books(books_csv)
  row = {a: i for i, a in enumerate(items["parent_asin"])}
  present = books["parent_asin"].map(row)
  new = books[present.isna().to_numpy()]
  old = books[present.notna().to_numpy()]
  changed = []
  if update_existing:
    for _, book in old.iterrows():
      current = items.iloc[row[book["parent_asin"]]]
      if not all(_same(book[c], current[c]) for c in METADATA_COLUMNS):
        changed.append(book)
  changed = pd.DataFrame(changed, columns=books.columns)
  result = CatalogResult(books=counts, added=list(new["parent_asin"]),
                         updated=list(changed["parent_asin"]),
                         unchanged=len(old) - len(changed),
                         items=len(items) + len(new), index={})
  if new.empty and changed.empty:
    return result

  candidate = tf.saved_model.load(os.path.join(directory, "candidate"))
  check = items.iloc[:min(_CHECK_ROWS, len(items))]
  if len(check):
    error = np.abs(embed(candidate, check)
                   - embeddings[:len(check)]).max()
    if not error < 1e-3:
      raise CatalogError(
          "The exported candidate tower does not reproduce embeddings.npy "
          f"(max difference {error:.3g}); re-export the run first.")
  if not changed.empty:
    rows = changed["parent_asin"].map(row).to_numpy(np.int64)
    embeddings = embeddings.copy()
    embeddings[rows] = embed(candidate, changed)
    for column in METADATA_COLUMNS:
      for r, value in zip(rows, changed[column]):
        items.at[r, column] = value
  if not new.empty:
    added = new.reset_index(drop=True).assign(train_count=0)
    added["categories"] = added["categories"].map(list)
    embeddings = np.concatenate([embeddings, embed(candidate, added)])
    items = pd.concat([items, added[list(ITEM_COLUMNS)]], ignore_index=True)
  items["train_count"] = items["train_count"].astype(np.int64)

  query = tf.saved_model.load(os.path.join(directory, "query"))
  seen = pd.read_parquet(os.path.join(directory, "seen.parquet"),
                         columns=["userId"])
  users = seen["userId"].drop_duplicates().to_numpy(dtype=str)
  sample = np.random.default_rng(0).choice(
      len(users), min(_MAX_QUERIES, len(users)), replace=False)
  queries = query.serving_default(tf.constant(users[sample]))["embedding"]
  config = ExportConfig(
      k=int(info["k"]),
      max_exclusions=int(info.get("retrieve", info["k"])) - int(info["k"]))
  staging = os.path.join(directory, ".catalog_staging")
  if os.path.exists(staging):
    shutil.rmtree(staging)
  os.makedirs(staging)
  index_info = export.build_indexes(
      query, embeddings, items["parent_asin"].to_numpy(),
      items["train_count"].to_numpy(np.float64), config, staging,
      queries.numpy())
  for name in ("index_brute_force", "index_scann"):
    target = os.path.join(directory, name)
    if os.path.exists(target):
      shutil.rmtree(target)
    if os.path.exists(os.path.join(staging, name)):
      os.replace(os.path.join(staging, name), target)
  shutil.rmtree(staging)
  _write_atomic(os.path.join(directory, "items.parquet"),
                items.to_parquet)
  with open(os.path.join(directory, "embeddings.npy.tmp"), "wb") as f:
    np.save(f, embeddings)
  os.replace(os.path.join(directory, "embeddings.npy.tmp"),
             os.path.join(directory, "embeddings.npy"))
  history = info.get("catalog", {})
  base_items = int(info.get("base_items", info.get("items", len(row))))
  new_info = {key: value for key, value in info.items()
              if key not in ("scann", "scann_agreement_at_k")}
  new_info.update(index_info)
  new_info["base_items"] = base_items
  new_info["catalog"] = {
      "added": int(history.get("added", 0)) + len(result.added),
      "updated": int(history.get("updated", 0)) + len(result.updated),
      "last_books_csv": os.path.abspath(books_csv)}

  def write_info(path):
    with open(path, "w") as f:
      json.dump(new_info, f, indent=2)

  _write_atomic(os.path.join(directory, "export.json"), write_info)
  result.index = index_info
  result.items = len(items)
  logging.info("Added %d and updated %d books in %s.", len(result.added),
               len(result.updated), directory)
  return result
