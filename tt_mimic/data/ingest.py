"""CSV -> validated, deduplicated, pruned, split and indexed artifacts.

The stage order is fixed and every row that leaves is counted by reason:

  books:  read -> missing parent_asin -> duplicate parent_asin -> books_limit
  events: read -> missing/invalid fields -> duplicate (user, book) pair
          -> book unknown to books.csv -> interactions_limit -> k-core
          -> split (leave-last-out or temporal cut-off)

Run alone with `tt-mimic ingest --flagfile=flags/sample.cfg`.
Everything here is pandas/NumPy; TensorFlow is not imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time

from absl import logging
import numpy as np
import pandas as pd

from tt_mimic.config import IngestConfig
from tt_mimic.data import parsing

BOOK_COLUMNS = ("parent_asin", "title", "author", "average_rating",
                "rating_number", "price", "categories")
EVENT_COLUMNS = ("parent_asin", "userId", "timestamp")
NUMERIC_COLUMNS = ("average_rating", "rating_number", "price")
SPLIT_TRAIN, SPLIT_VAL, SPLIT_TEST = 0, 1, 2
ARTIFACT_VERSION = "1"


class IngestError(ValueError):
  """Input that cannot be turned into a training set, with the reason."""


@dataclasses.dataclass
class Ingested:
  """The artifacts of one ingest.

  Attributes:
    items: DataFrame, one row per corpus book (row i has corpus index i + 1;
      index 0 is reserved for padding/unknown): parent_asin, title, author,
      average_rating, rating_number, price (float, NaN = missing),
      categories (list of str), train_count.
    users: array of userId strings; row i has user index i + 1.
    events: DataFrame sorted by (user, timestamp, item): user (int32),
      item (int32 corpus index), timestamp (int64 ms), split (int8).
    report: dict of counts (see `Report`).
    directory: where the artifacts are stored (None until saved).
  """
  items: pd.DataFrame
  users: np.ndarray
  events: pd.DataFrame
  report: dict
  directory: str | None = None


class Report:
  """Counts rows read, dropped by reason and kept, per file and stage."""

  def __init__(self):
    self.data = {"books": {"read": 0, "dropped": {}, "kept": 0},
                 "events": {"read": 0, "dropped": {}, "kept": 0},
                 "invalid_values": {}, "stages": [], "splits": {}}

  def drop(self, table: str, reason: str, count: int) -> None:
    dropped = self.data[table]["dropped"]
    dropped[reason] = dropped.get(reason, 0) + int(count)

  def stage(self, name: str, events: pd.DataFrame) -> None:
    self.data["stages"].append({
        "stage": name, "events": int(len(events)),
        "users": int(events["userId"].nunique()),
        "items": int(events["parent_asin"].nunique())})
    if events.empty:
      raise IngestError(
          f"No events are left after stage '{name}'. Counts so far: "
          f"{json.dumps(self.data['stages'])}; dropped: "
          f"{json.dumps(self.data['events']['dropped'])}.")


def _read_csv(path: str, required: tuple[str, ...], what: str) -> pd.DataFrame:
  """Reads the required columns of a CSV (any order, extras ignored) as text."""
  if not os.path.exists(path):
    raise IngestError(f"{what} file not found: {path}")
  try:
    header = pd.read_csv(path, nrows=0, engine="python")
  except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as e:
    raise IngestError(f"Cannot read {what} file {path}: {e}") from e
  except pd.errors.EmptyDataError as e:
    raise IngestError(f"{what} file {path} is empty (no header row).") from e
  raw = {str(c).strip(): c for c in header.columns}
  found = list(raw)
  missing = [c for c in required if c not in found]
  if missing:
    raise IngestError(
        f"{what} file {path} is missing required column(s) {missing}; "
        f"columns found: {found}")
  usecols = [raw[c] for c in required]
  malformed = []
  try:
    frame = pd.read_csv(path, usecols=usecols, dtype=str,
                        keep_default_na=False, engine="pyarrow")
  except Exception:  # pyarrow rejects some malformed rows; retry leniently.
    logging.warning("pyarrow could not parse %s; falling back to the "
                    "python CSV parser (malformed rows are counted).", path)
    frame = pd.read_csv(path, usecols=usecols, dtype=str,
                        keep_default_na=False, engine="python",
                        on_bad_lines=lambda line: malformed.append(line))
  frame = frame.rename(columns=lambda c: str(c).strip())
  return frame[list(required)].fillna(""), len(malformed)


def read_books(config: IngestConfig, report: Report) -> pd.DataFrame:
  """Reads, validates and parses books.csv; drops are counted in `report`."""
  books, malformed = _read_csv(config.books_csv, BOOK_COLUMNS, "books")
  report.data["books"]["read"] = len(books) + malformed
  if malformed:
    report.drop("books", "malformed_row", malformed)
  asin = books["parent_asin"].str.strip()
  empty = asin == ""
  report.drop("books", "missing_parent_asin", empty.sum())
  books = books[~empty].assign(parent_asin=asin[~empty])
  dup = books["parent_asin"].duplicated(keep="first")
  report.drop("books", "duplicate_parent_asin", dup.sum())
  books = books[~dup]
  if config.books_limit and len(books) > config.books_limit:
    report.drop("books", "over_books_limit", len(books) - config.books_limit)
    books = books.iloc[:config.books_limit]
  out = pd.DataFrame({"parent_asin": books["parent_asin"].to_numpy()})
  out["title"] = parsing.parse_title(books["title"])
  out["author"] = parsing.clean_author(books["author"])
  out["categories"] = parsing.parse_json_list(books["categories"])
  for column in NUMERIC_COLUMNS:
    values, invalid = parsing.parse_nonnegative(books[column])
    out[column] = values
    report.data["invalid_values"][column] = invalid
  report.data["books"]["kept"] = len(out)
  return out


def _categorical(values: pd.Series) -> pd.Categorical:
  codes, uniques = pd.factorize(values)
  return pd.Categorical.from_codes(codes.astype(np.int32), categories=uniques)


def read_events(config: IngestConfig, known_books: pd.Index,
                report: Report) -> pd.DataFrame:
  """Reads users.csv, counts and drops bad, duplicate and unknown events."""
  events, malformed = _read_csv(config.users_csv, EVENT_COLUMNS, "users")
  report.data["events"]["read"] = len(events) + malformed
  if malformed:
    report.drop("events", "malformed_row", malformed)
  events = events.assign(parent_asin=events["parent_asin"].str.strip(),
                         userId=events["userId"].str.strip())
  ts = pd.to_numeric(events["timestamp"].str.strip(), errors="coerce")
  bad = np.zeros(len(events), dtype=bool)
  for reason, mask in (("missing_user_id", events["userId"] == ""),
                       ("missing_parent_asin", events["parent_asin"] == ""),
                       ("invalid_timestamp",
                        ts.isna() | ~((ts >= 0) & (ts < 2.0**63)))):
    mask = mask.to_numpy() & ~bad  # each row counts under its first reason
    report.drop("events", reason, mask.sum())
    bad |= mask
  events, ts = events[~bad], ts[~bad]
  # Ids become categorical right away: integer codes plus one copy of each
  # distinct string, which keeps dedupe, joins and k-core integer work.
  events = pd.DataFrame({"userId": _categorical(events["userId"]),
                         "parent_asin": _categorical(events["parent_asin"]),
                         "timestamp": ts.to_numpy().astype(np.int64)})
  report.stage("valid", events)
  # One interaction per (user, book): the earliest; ties by file order.
  order = np.lexsort((np.arange(len(events)), events["timestamp"].to_numpy()))
  dup = events.iloc[order].duplicated(["userId", "parent_asin"], keep="first")
  dup = dup.reindex(events.index).to_numpy()
  report.drop("events", "duplicate_event", dup.sum())
  events = events[~dup]
  report.stage("deduplicated", events)
  unknown = ~events["parent_asin"].isin(known_books).to_numpy()
  report.drop("events", "unknown_book", unknown.sum())
  events = events[~unknown]
  report.stage("known_books", events)
  if config.interactions_limit and len(events) > config.interactions_limit:
    report.drop("events", "over_interactions_limit",
                len(events) - config.interactions_limit)
    events = events.iloc[:config.interactions_limit]
    report.stage("interactions_limit", events)
  return events.reset_index(drop=True)


def kcore(events: pd.DataFrame, min_user: int, min_item: int,
          report: Report) -> pd.DataFrame:
  """Iteratively drops users/items below their thresholds until stable."""
  users = events["userId"].astype("category").cat.codes.to_numpy()
  items = events["parent_asin"].astype("category").cat.codes.to_numpy()
  keep = np.ones(len(events), dtype=bool)
  rounds = 0
  while True:
    rounds += 1
    user_counts = np.bincount(users[keep], minlength=users.max() + 1)
    bad_user = keep & (user_counts[users] < min_user)
    report.drop("events", "kcore_user", bad_user.sum())
    keep &= ~bad_user
    item_counts = np.bincount(items[keep], minlength=items.max() + 1)
    bad_item = keep & (item_counts[items] < min_item)
    report.drop("events", "kcore_item", bad_item.sum())
    keep &= ~bad_item
    if not bad_user.any() and not bad_item.any():
      break
  report.data["kcore_rounds"] = rounds
  events = events[keep].reset_index(drop=True)
  report.stage("kcore", events)
  return events


def assign_split(events: pd.DataFrame, config: IngestConfig) -> np.ndarray:
  """Split labels for events sorted by (user, timestamp, item).

  leave_last_out: each user's latest event is test and the one before it
  validation (users with fewer than 3 events keep all of them in train).
  temporal: events at or after the cut-off are test; the latest
  `val_fraction` of the earlier events (by time) are validation.
  """
  n = len(events)
  split = np.full(n, SPLIT_TRAIN, dtype=np.int8)
  if config.split == "leave_last_out":
    user = events["user"].to_numpy()
    last = np.r_[user[1:] != user[:-1], True]
    second = np.r_[last[1:], False] & ~last
    count = np.bincount(user)[user]
    split[last & (count >= 3)] = SPLIT_TEST
    split[second & (count >= 3)] = SPLIT_VAL
  elif config.split == "temporal":
    ts = events["timestamp"].to_numpy()
    cutoff = config.split_cutoff_ms or int(np.quantile(ts, 0.9))
    before = ts < cutoff
    if not before.any():
      raise IngestError(f"split_cutoff_ms={cutoff} leaves no training events "
                        f"(earliest event at {ts.min()}).")
    split[~before] = SPLIT_TEST
    if config.val_fraction > 0:
      val_cut = int(np.quantile(ts[before], 1.0 - config.val_fraction))
      split[before & (ts >= val_cut)] = SPLIT_VAL
  else:
    raise IngestError(f"Unknown split {config.split!r}; expected "
                      "'leave_last_out' or 'temporal'.")
  return split


def _sorted_codes(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
  """Categorical ids -> (codes into the sorted distinct values, the values)."""
  values = values.cat.remove_unused_categories()
  distinct = np.asarray(values.cat.categories, dtype=object)
  order = np.argsort(distinct, kind="stable")
  rank = np.empty(len(order), np.int64)
  rank[order] = np.arange(len(order))
  return rank[values.cat.codes.to_numpy()], distinct[order]


def index(books: pd.DataFrame, events: pd.DataFrame,
          config: IngestConfig, report: Report) -> Ingested:
  """Integer ids, split labels and the corpus item table."""
  user_codes, users = _sorted_codes(events["userId"])
  item_codes, asins = _sorted_codes(events["parent_asin"])
  frame = pd.DataFrame({"user": user_codes.astype(np.int32) + 1,
                        "item": item_codes.astype(np.int32) + 1,
                        "timestamp": events["timestamp"].to_numpy()})
  frame = frame.sort_values(["user", "timestamp", "item"], kind="stable")
  frame = frame.reset_index(drop=True)
  frame["split"] = assign_split(frame, config)
  items = books.set_index("parent_asin").loc[np.asarray(asins)].reset_index()
  train = frame[frame["split"] == SPLIT_TRAIN]
  counts = np.bincount(train["item"], minlength=len(items) + 1)[1:]
  items["train_count"] = counts.astype(np.int64)
  for name, code in (("train", SPLIT_TRAIN), ("val", SPLIT_VAL),
                     ("test", SPLIT_TEST)):
    part = frame[frame["split"] == code]
    report.data["splits"][name] = {"events": int(len(part)),
                                   "users": int(part["user"].nunique())}
  if not (frame["split"] == SPLIT_TRAIN).any():
    raise IngestError("The split left no training events.")
  report.data["events"]["kept"] = int(len(frame))
  report.data["corpus"] = {"items": int(len(items)), "users": int(len(users)),
                           "items_in_train": int((counts > 0).sum())}
  return Ingested(items=items, users=np.asarray(users, dtype=object),
                  events=frame, report=report.data)


def run(config: IngestConfig) -> Ingested:
  """Runs every stage; raises IngestError with counts when input is unusable."""
  start = time.time()
  report = Report()
  books = read_books(config, report)
  if books.empty:
    raise IngestError(f"No valid books in {config.books_csv}: "
                      f"{json.dumps(report.data['books'])}")
  events = read_events(config, pd.Index(books["parent_asin"]), report)
  events = kcore(events, config.min_user_interactions,
                 config.min_item_interactions, report)
  result = index(books, events, config, report)
  report.data["config"] = dataclasses.asdict(config)
  report.data["seconds"] = round(time.time() - start, 2)
  check_counts(report.data)
  return result


def check_counts(data: dict) -> None:
  """Asserts that read = kept + sum(dropped) for both files."""
  for table in ("books", "events"):
    part = data[table]
    if part["read"] != part["kept"] + sum(part["dropped"].values()):
      raise AssertionError(f"{table} counts do not add up: {part}")


def summary(report: dict) -> str:
  """One readable block of the report's counts."""
  lines = []
  for table in ("books", "events"):
    part = report[table]
    drops = ", ".join(f"{k}={v}" for k, v in part["dropped"].items() if v)
    lines.append(f"{table}: read {part['read']}, kept {part['kept']}, "
                 f"dropped {sum(part['dropped'].values())} ({drops or 'none'})")
  for stage in report["stages"]:
    lines.append(f"  after {stage['stage']:<18} events={stage['events']} "
                 f"users={stage['users']} items={stage['items']}")
  invalid = ", ".join(f"{k}={v}" for k, v in report["invalid_values"].items())
  lines.append(f"numeric values set missing: {invalid}")
  splits = ", ".join(f"{k}: {v['events']} events/{v['users']} users"
                     for k, v in report["splits"].items())
  lines.append(f"splits: {splits}")
  return "\n".join(lines)


# ----------------------------------------------------------------- caching


def cache_key(config: IngestConfig) -> str:
  """Hash of the inputs' identity (path, size, mtime) and the parameters."""
  h = hashlib.sha256(ARTIFACT_VERSION.encode())
  for path in (config.books_csv, config.users_csv):
    st = os.stat(path)
    h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
  h.update(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
  return h.hexdigest()[:16]


def save(result: Ingested, directory: str) -> None:
  os.makedirs(directory, exist_ok=True)
  result.items.to_parquet(os.path.join(directory, "items.parquet"))
  result.events.to_parquet(os.path.join(directory, "events.parquet"))
  pd.DataFrame({"userId": result.users}).to_parquet(
      os.path.join(directory, "users.parquet"))
  with open(os.path.join(directory, "ingest_report.json"), "w") as f:
    json.dump(result.report, f, indent=2)


def load(directory: str) -> Ingested:
  items = pd.read_parquet(os.path.join(directory, "items.parquet"))
  items["categories"] = items["categories"].map(list)
  events = pd.read_parquet(os.path.join(directory, "events.parquet"))
  users = pd.read_parquet(os.path.join(directory, "users.parquet"))
  with open(os.path.join(directory, "ingest_report.json")) as f:
    report = json.load(f)
  return Ingested(items=items, users=users["userId"].to_numpy(dtype=object),
                  events=events, report=report, directory=directory)


def run_cached(config: IngestConfig, model_dir: str,
               cache_dir: str | None = None) -> Ingested:
  """`run`, reusing artifacts cached under the inputs+parameters key.

  The artifacts live in `<cache_dir>/<key>/` (default `<model_dir>/ingest`);
  the report is also copied to `<model_dir>/ingest_report.json`.
  """
  for path, what in ((config.books_csv, "books"), (config.users_csv, "users")):
    if not os.path.exists(path):
      raise IngestError(f"{what} file not found: {path}")
  key = cache_key(config)
  directory = os.path.join(cache_dir or os.path.join(model_dir, "ingest"), key)
  if os.path.exists(os.path.join(directory, "ingest_report.json")):
    logging.info("Ingest cache hit: %s", directory)
    result = load(directory)
  else:
    result = run(config)
    save(result, directory + ".tmp")
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(directory + ".tmp", directory)
    result.directory = directory
  os.makedirs(model_dir, exist_ok=True)
  with open(os.path.join(model_dir, "ingest_report.json"), "w") as f:
    json.dump(result.report, f, indent=2)
  logging.info("Ingest summary\n%s", summary(result.report))
  return result
