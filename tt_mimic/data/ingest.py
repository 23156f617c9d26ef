"""Input files -> validated, deduplicated, pruned, split and indexed artifacts.

The inputs are CSVs in the project's schema or the official Amazon Reviews
2023 JSONL files (`Books.jsonl`, `meta_Books.jsonl`, plain or gzipped), by
file name (`input_format`): both read into the same text columns (see
`reader` and `jsonl`), and everything after that is shared.

The stage order is fixed and every row that leaves is counted by reason:

  books:  read (malformed_row, field_too_large, invalid_utf8: see `reader`)
          -> missing parent_asin -> duplicate parent_asin -> books_limit
  events: read (as books) -> missing/invalid fields -> timestamps before
          MIN_TIMESTAMP_MS or in the future -> rating missing or below
          min_rating (when set) -> duplicate (user, book) pair
          -> book unknown to books.csv -> interactions_limit -> k-core
          -> split (leave-last-out or temporal cut-off)

Rows kept after a repair are counted in the report's `repaired`: books
cells with undecodable bytes (outside parent_asin) decoded with U+FFFD,
and malformed title/categories list cells read leniently (see `parsing`).

Timestamps are epoch milliseconds. A users file whose timestamps mostly
(at least half of the numeric ones) lie below MIN_TIMESTAMP_MS (1e11 ms,
1973-03-03) is in seconds or another unit: it is refused with an
IngestError rather than converted, since a guessed unit would silently
shift every event and `split_cutoff_ms`. In a file in milliseconds, the
few rows below that bound, and rows more than a day after the ingest's
clock, are dropped and counted.

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
from tt_mimic.data import jsonl
from tt_mimic.data import parsing
from tt_mimic.data import reader

BOOK_COLUMNS = ("parent_asin", "title", "author", "average_rating",
                "rating_number", "price", "categories")
EVENT_COLUMNS = ("parent_asin", "userId", "timestamp")
RATING = "rating"  # optional events column (a JSONL review's rating)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson",
                  ".ndjson.gz")
NUMERIC_COLUMNS = ("average_rating", "rating_number", "price")
SPLIT_TRAIN, SPLIT_VAL, SPLIT_TEST = 0, 1, 2
ARTIFACT_VERSION = "2"
MIN_TIMESTAMP_MS = 100_000_000_000  # 1973-03-03; below: likely seconds
FUTURE_SLACK_MS = 86_400_000  # a day of clock and time-zone skew

IngestError = reader.IngestError


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
      item (int32 corpus index), timestamp (int64 ms), split (int8), and
      rating (float32, NaN = missing) when the users file has ratings.
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
                 "repaired": {"books": {}, "events": {}},
                 "invalid_values": {}, "stages": [], "splits": {}}
    self.start = time.monotonic()

  def log(self, message: str, *args) -> None:
    """A progress line of the ingest, with the time since it started."""
    logging.info("ingest [%.1f s]: " + message,
                 time.monotonic() - self.start, *args)

  def drop(self, table: str, reason: str, count: int) -> None:
    dropped = self.data[table]["dropped"]
    dropped[reason] = dropped.get(reason, 0) + int(count)

  def repair(self, table: str, reason: str, count: int) -> None:
    """Counts rows kept after a repair (not part of read = kept + dropped)."""
    repaired = self.data["repaired"][table]
    repaired[reason] = repaired.get(reason, 0) + int(count)

  def stage(self, name: str, events: pd.DataFrame) -> None:
    self.data["stages"].append({
        "stage": name, "events": int(len(events)),
        "users": int(events["userId"].nunique()),
        "items": int(events["parent_asin"].nunique())})
    self.log("%s: %d events, %d users, %d books", name,
             *(self.data["stages"][-1][k] for k in ("events", "users",
                                                    "items")))
    if events.empty:
      raise IngestError(
          f"No events are left after stage '{name}'. Counts so far: "
          f"{json.dumps(self.data['stages'])}; dropped: "
          f"{json.dumps(self.data['events']['dropped'])}.")


def input_format(config: IngestConfig, path: str) -> str:
  """"csv" or "jsonl": `config.input_format`, or by the file's name."""
  if config.input_format != "auto":
    return config.input_format
  return "jsonl" if path.lower().endswith(JSONL_SUFFIXES) else "csv"


def _read(config: IngestConfig, path: str, what: str, table: str,
          keys: tuple[str, ...], report: Report) -> pd.DataFrame:
  """Reads a CSV or JSONL file, with its rows read, dropped, repaired counted."""
  if input_format(config, path) == "jsonl":
    columns = jsonl.BOOK_COLUMNS if table == "books" else jsonl.EVENT_COLUMNS
    optional = {} if table == "books" else {RATING: jsonl.RATING}
    result = jsonl.read_jsonl(path, columns, what, keys, optional)
  else:
    columns = BOOK_COLUMNS if table == "books" else EVENT_COLUMNS
    optional = () if table == "books" else (RATING,)
    result = reader.read_csv(path, columns, what, keys, optional)
  report.data[table]["read"] = len(result.frame) + sum(
      result.dropped.values())
  for reason, count in result.dropped.items():
    if count:
      report.drop(table, reason, count)
  for reason, count in result.repaired.items():
    if count:
      report.repair(table, reason, count)
  return result.frame


def read_books(config: IngestConfig, report: Report) -> pd.DataFrame:
  """Reads, validates and parses the books file; drops counted in `report`."""
  books = _read(config, config.books_csv, "books", "books", ("parent_asin",),
                report)
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
  out["title"], malformed = parsing.parse_title(books["title"])
  report.repair("books", "malformed_list_title", malformed)
  out["author"] = parsing.clean_author(books["author"])
  out["categories"], malformed = parsing.parse_json_list(books["categories"])
  report.repair("books", "malformed_list_categories", malformed)
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
  """Reads the users file; counts and drops bad, duplicate, unknown events."""
  events = _read(config, config.users_csv, "users", "events", EVENT_COLUMNS,
                 report)
  rating = _ratings(events, config, report)
  events = events.assign(parent_asin=events["parent_asin"].str.strip(),
                         userId=events["userId"].str.strip())
  ts = pd.to_numeric(events["timestamp"].str.strip(), errors="coerce")
  ts = ts.to_numpy(dtype=np.float64, na_value=np.nan)
  invalid = np.isnan(ts) | ~((ts >= 0) & (ts < 2.0**63))
  _check_milliseconds(ts[~invalid], config.users_csv)
  now_ms = time.time() * 1000 + FUTURE_SLACK_MS
  bad = np.zeros(len(events), dtype=bool)
  for reason, mask in (
      ("missing_user_id", (events["userId"] == "").to_numpy()),
      ("missing_parent_asin", (events["parent_asin"] == "").to_numpy()),
      ("invalid_timestamp", invalid),
      ("timestamp_before_1973", ~invalid & (ts < MIN_TIMESTAMP_MS)),
      ("timestamp_in_future", ~invalid & (ts > now_ms)),
      ("missing_rating", np.isnan(rating) & (config.min_rating > 0)),
      ("below_min_rating", rating < config.min_rating)):
    mask = mask & ~bad  # each row counts under its first reason
    report.drop("events", reason, mask.sum())
    bad |= mask
  events, ts, rating = events[~bad], ts[~bad], rating[~bad]
  # Ids become categorical right away: integer codes plus one copy of each
  # distinct string, which keeps dedupe, joins and k-core integer work.
  columns = {"userId": _categorical(events["userId"]),
             "parent_asin": _categorical(events["parent_asin"]),
             "timestamp": ts.astype(np.int64)}
  if RATING in events:
    columns[RATING] = rating.astype(np.float32)
  events = pd.DataFrame(columns)
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


def _ratings(events: pd.DataFrame, config: IngestConfig,
             report: Report) -> np.ndarray:
  """The events' ratings (NaN = missing or invalid; all NaN without any).

  Raises:
    IngestError: --min_rating is set and the file has no ratings.
  """
  if RATING not in events:
    if config.min_rating > 0:
      raise IngestError(
          f"--min_rating={config.min_rating} needs ratings, and users file "
          f"{config.users_csv} has none (a 'rating' column or JSON field).")
    return np.full(len(events), np.nan)
  values, invalid = parsing.parse_nonnegative(events[RATING])
  report.data["invalid_values"][RATING] = invalid
  return values


def _check_milliseconds(ts: np.ndarray, path: str) -> None:
  """Refuses timestamps that are mostly below MIN_TIMESTAMP_MS (seconds?)."""
  early = int((ts < MIN_TIMESTAMP_MS).sum())
  if len(ts) and early * 2 >= len(ts):
    raise IngestError(
        f"users file {path}: {early} of {len(ts)} timestamps are below "
        f"{MIN_TIMESTAMP_MS} (1973-03-03 in epoch ms; median "
        f"{int(np.median(ts))}). The timestamp column must be epoch "
        "milliseconds; if it is in seconds, multiply it by 1000.")


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
  if RATING in events:
    frame[RATING] = events[RATING].to_numpy()
  frame = frame.sort_values(["user", "timestamp", "item"], kind="stable")
  frame = frame.reset_index(drop=True)
  frame.insert(3, "split", assign_split(frame, config))
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
  report.log("reading books from %s", config.books_csv)
  books = read_books(config, report)
  report.log("%d books kept of %d read; reading events from %s", len(books),
             report.data["books"]["read"], config.users_csv)
  if books.empty:
    raise IngestError(f"No valid books in {config.books_csv}: "
                      f"{json.dumps(report.data['books'])}")
  events = read_events(config, pd.Index(books["parent_asin"]), report)
  events = kcore(events, config.min_user_interactions,
                 config.min_item_interactions, report)
  result = index(books, events, config, report)
  report.log("indexed and split")
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
  for table, part in report.get("repaired", {}).items():
    fixes = ", ".join(f"{k}={v}" for k, v in part.items() if v)
    if fixes:
      lines.append(f"{table}: kept after repair ({fixes})")
  invalid = ", ".join(f"{k}={v}" for k, v in report["invalid_values"].items())
  lines.append(f"numeric values set missing: {invalid}")
  splits = ", ".join(f"{k}: {v['events']} events/{v['users']} users"
                     for k, v in report["splits"].items())
  lines.append(f"splits: {splits}")
  return "\n".join(lines)


# ----------------------------------------------------------------- caching


def cache_key(config: IngestConfig) -> str:
  """Hash of the inputs' identity (resolved path, size, mtime) and the
  parameters: every spelling of a file (`data/books.csv`,
  `./data/books.csv`, its absolute path, a path through a symlink) shares
  a key, as a run's trained variants do (`trainer`)."""
  resolved = dataclasses.replace(
      config, books_csv=os.path.realpath(config.books_csv),
      users_csv=os.path.realpath(config.users_csv))
  h = hashlib.sha256(ARTIFACT_VERSION.encode())
  for path in (resolved.books_csv, resolved.users_csv):
    st = os.stat(path)
    h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode())
  h.update(json.dumps(dataclasses.asdict(resolved), sort_keys=True).encode())
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
