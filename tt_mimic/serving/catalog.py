"""Adds new books to an exported run without retraining.

  tt-mimic catalog --model_dir=<run> --books_csv=<new books csv> \
      [--update_existing]

The CSV (books.csv schema) is read with ingest's parsing, bad rows are
skipped and counted. Books not yet in the export are embedded from their
metadata alone by the exported `candidate/` tower (their id embedding is the
unknown-book one, as for any book unseen in training), appended to
`items.parquet` and `embeddings.npy`, and the serving model and the ScaNN
index are rebuilt around the served version's query part (same k and
exclusion headroom; ScaNN parameters picked afresh for the new corpus size,
agreement re-measured). With
--update_existing, books already in the export whose metadata changed are
re-embedded in place.

Each run writes a new export version (see tt_mimic.serving.recommender):
the serving model, the ScaNN index, items.parquet, embeddings.npy and
export.json are built in `export/versions/.staging-<n>/`; when complete the
serving model is renamed to `export/serving/<n>/` (where TensorFlow Serving
picks it up), the rest to `export/versions/<n>/`, and only then is the
version named in `export/CURRENT` (an atomic replace). A
running `tt-mimic serve` picks the new version up without a restart. One
catalog runs at a time per export (a lock file); each run first removes what
an interrupted run left behind (staging directories, versions never named
in CURRENT, older versions, and their serving models), keeping the current
version and version 1.

New books can be recommended at once, and their popularity is zero. The
query tower has no id for them, so in a user's history each stands as the
trained book whose candidate embedding is nearest to its own (its
`history_proxy` in items.parquet) until the model is retrained.
"""

from __future__ import annotations

import contextlib
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
from tt_mimic.training import pipeline

METADATA_COLUMNS = ("title", "author", "categories") + ingest.NUMERIC_COLUMNS
ITEM_COLUMNS = ("parent_asin",) + METADATA_COLUMNS + ("train_count",)
_CHECK_ROWS = 64  # exported books re-embedded to check the candidate tower
_MAX_QUERIES = 1000  # users whose embeddings measure ScaNN against brute force
_LOCK = ".catalog.lock"
_STAGING = ".staging-"
_LEGACY_STAGING = ".catalog_staging"  # where catalogs before versions built
_PROXY_BLOCK = 1 << 26  # scores computed at once when choosing proxies


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
    version: the export version written (0 when nothing changed).
  """
  books: dict
  added: list
  updated: list
  unchanged: int
  items: int
  index: dict
  version: int = 0

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
          f"export version {self.version}: rebuilt indexes over "
          f"{self.items} books (k={self.index['k']}"
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


@contextlib.contextmanager
def _locked(directory: str):
  """Holds the export's catalog lock (released when the process ends)."""
  lock = contextlib.ExitStack()
  try:
    lock.enter_context(pipeline.run_lock(directory, create=False,
                                         lock_file=_LOCK))
  except pipeline.RunDirBusyError as e:
    raise CatalogError(f"Another tt-mimic catalog ({e.holder}) is writing "
                       f"{directory}; wait for it to finish.") from None
  with lock:
    yield


def clean_stale(directory: str) -> list[str]:
  """Removes what interrupted catalogs left; keeps the current version.

  Under the catalog lock, every staging directory is stale, and so is every
  version but the current one (versions renamed into place but never named
  in CURRENT, versions made from an earlier export, older versions).

  Returns:
    The paths removed.
  """
  version, _, _ = recommend.current_version(directory)
  stale = [os.path.join(directory, _LEGACY_STAGING)]
  versions = os.path.join(directory, recommend.VERSIONS)
  if os.path.isdir(versions):
    stale += [os.path.join(versions, name) for name in os.listdir(versions)
              if name != str(version)]
  serving = os.path.join(directory, recommend.SERVING)
  if os.path.isdir(serving):
    stale += [os.path.join(serving, name) for name in os.listdir(serving)
              if name not in ("1", str(version))]
  removed = [path for path in stale if os.path.lexists(path)]
  for path in removed:
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  if removed:
    logging.info("Removed what an interrupted catalog left: %s", removed)
  return removed


def history_proxies(embeddings: np.ndarray, base_items: int) -> np.ndarray:
  """For each book after the first `base_items`, the nearest of those.

  Args:
    embeddings: [n, dim] candidate embeddings; the first `base_items` rows
      are the books the query tower knows.
    base_items: how many books the query tower knows.

  Returns:
    [n - base_items] row numbers in 0..base_items-1 (by dot product).
  """
  base = embeddings[:base_items]
  rows = max(1, _PROXY_BLOCK // max(base_items, 1))
  out = []
  for start in range(base_items, len(embeddings), rows):
    scores = embeddings[start:start + rows] @ base.T
    out.append(np.argmax(scores, axis=1))
  return np.concatenate(out) if out else np.zeros(0, np.int64)


def _blend_tables(serving):
  """The EASE tables of a blend's serving model (new books have no EASE
  weights: they score by the towers alone), else None."""
  if not hasattr(serving, "ease_columns"):
    return None
  return serving.ease_columns.numpy(), serving.ease_values.numpy()


def add_books(model_dir: str, books_csv: str,
              update_existing: bool = False) -> CatalogResult:
  """Embeds the new books of `books_csv` into a new export version.

  Args:
    model_dir: a training run directory (or its export directory).
    books_csv: books.csv-schema file of new (or updated) books.
    update_existing: re-embed books already exported whose metadata changed.

  Returns:
    A CatalogResult.

  Raises:
    recommend.ExportError: no usable export.
    ingest.IngestError: the CSV cannot be read.
    CatalogError: the candidate tower does not reproduce the export, or
      another catalog is writing the export.
  """
  directory = recommend.export_directory(model_dir)
  with _locked(directory):
    clean_stale(directory)
    return _add_books(directory, books_csv, update_existing)


def _add_books(directory: str, books_csv: str,
               update_existing: bool) -> CatalogResult:
  """add_books under the lock."""
  version, source, _ = recommend.current_version(directory)
  base = recommend.base_fingerprint(directory)
  with open(os.path.join(source, "export.json")) as f:
    info = json.load(f)
  items = pd.read_parquet(os.path.join(source, "items.parquet"))
  items["categories"] = items["categories"].map(
      lambda c: [] if c is None else [str(x) for x in c])
  embeddings = np.load(os.path.join(source, "embeddings.npy"))
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

  candidate = recommend.load_candidate(directory)
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
  base_items = int(info.get("base_items", info.get("items", len(row))))
  proxies = history_proxies(embeddings, base_items)
  items["history_proxy"] = [""] * base_items + list(
      items["parent_asin"].to_numpy()[proxies])

  # The query part (and its per-user state) of the served version's model.
  serving = recommend.load_serving(directory, version)
  query = serving.query
  seen = pd.read_parquet(os.path.join(directory, "seen.parquet"),
                         columns=["userId"])
  users = seen["userId"].drop_duplicates().to_numpy(dtype=str)
  sample = np.random.default_rng(0).choice(
      len(users), min(_MAX_QUERIES, len(users)), replace=False)
  queries = query.serving_default(tf.constant(users[sample]))["embedding"]
  config = ExportConfig(
      k=int(info["k"]),
      max_exclusions=int(info.get("retrieve", info["k"])) - int(info["k"]))
  target = version + 1
  staging = os.path.join(directory, recommend.VERSIONS, f"{_STAGING}{target}")
  os.makedirs(staging)
  try:
    index_info = export.build_indexes(
        query, embeddings, items["parent_asin"].to_numpy(),
        items["train_count"].to_numpy(np.float64), config, staging,
        queries.numpy(), _blend_tables(serving))
    items.to_parquet(os.path.join(staging, "items.parquet"))
    np.save(os.path.join(staging, "embeddings.npy"), embeddings)
    history = info.get("catalog", {})
    new_info = {key: value for key, value in info.items()
                if key not in ("scann", "scann_agreement_at_k")}
    new_info.update(index_info)
    new_info["base_items"] = base_items
    new_info["version"] = target
    new_info["base_export"] = base
    new_info["catalog"] = {
        "added": int(history.get("added", 0)) + len(result.added),
        "updated": int(history.get("updated", 0)) + len(result.updated),
        "last_books_csv": os.path.abspath(books_csv)}
    with open(os.path.join(staging, "export.json"), "w") as f:
      json.dump(new_info, f, indent=2)
    if recommend.base_fingerprint(directory) != base:
      raise CatalogError("The run was re-exported while the catalog ran; "
                         "nothing was published. Run the catalog again.")
    # Complete: publish the serving model (TensorFlow Serving may load it
    # from here on), then the version, then name it.
    os.makedirs(os.path.join(directory, recommend.SERVING), exist_ok=True)
    os.rename(os.path.join(staging, export.STAGED_SERVING),
              recommend.serving_path(directory, target))
    os.rename(staging, recommend.version_path(directory, target))
  finally:
    shutil.rmtree(staging, ignore_errors=True)

  def write_current(path):
    with open(path, "w") as f:
      f.write(f"{target}\n")
      f.flush()
      os.fsync(f.fileno())

  _write_atomic(os.path.join(directory, recommend.CURRENT), write_current)
  result.index = index_info
  result.items = len(items)
  result.version = target
  logging.info("Added %d and updated %d books in %s (version %d).",
               len(result.added), len(result.updated), directory, target)
  return result
