"""Tests for tt_mimic.data.jsonl and ingest of the Amazon release's JSONL.

Small files in the release's exact schema (`tiny_data.write_jsonl`) and
its quirks (author an object, null or missing; price "$12.99", a number or
null; empty categories), bad lines of every kind, a truncated gzip, the
`--min_rating` filter, and a hypothesis fuzz test as for the CSVs.
"""

import dataclasses
import gzip
import json
import os
import tempfile

from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pandas as pd
import pytest

import tiny_data
from tt_mimic.config import IngestConfig
from tt_mimic.data import ingest
from tt_mimic.data import jsonl
from tt_mimic.data import reader


def _write(path, lines, compress=False) -> str:
  """Writes lines (dicts as JSON, str/bytes as they are) one per line."""
  data = b"".join(
      (json.dumps(x).encode() if isinstance(x, dict) else
       x.encode() if isinstance(x, str) else x) + b"\n" for x in lines)
  with open(path, "wb") as f:
    f.write(gzip.compress(data, mtime=0) if compress else data)
  return str(path)


def _meta(asin, **fields):
  return {"main_category": "Books", "title": f"Title {asin}",
          "subtitle": "Hardcover", "author": {"name": "Ann Author"},
          "average_rating": 4.5, "rating_number": 12, "price": "$12.99",
          "categories": ["Books", "History"], "details": {"Pages": 300},
          "parent_asin": asin, **fields}


def _review(asin, user, ts=1_600_000_000_000, **fields):
  return {"rating": 4.0, "title": "Good", "text": "Fine, \"really\".",
          "asin": asin, "parent_asin": asin, "user_id": user,
          "timestamp": ts, "helpful_vote": 0, "verified_purchase": True,
          **fields}


def _books(path, **overrides):
  report = ingest.Report()
  config = IngestConfig(books_csv=str(path), users_csv="", books_limit=0,
                        **overrides)
  books = ingest.read_books(config, report)
  part = report.data["books"]
  assert part["read"] == part["kept"] + sum(part["dropped"].values()), part
  return books, report.data


def _events(path, known=("B0", "B1", "B2"), **overrides):
  report = ingest.Report()
  config = IngestConfig(books_csv="", users_csv=str(path),
                        interactions_limit=0, **overrides)
  events = ingest.read_events(config, pd.Index(list(known)), report)
  part = report.data["events"]
  assert part["read"] == len(events) + sum(part["dropped"].values()), part
  return events, report.data


# ----------------------------------------------------- the release's quirks


def test_meta_quirks_become_the_csv_values(tmp_path):
  path = _write(tmp_path / "meta_Books.jsonl", [
      _meta("B0"),
      _meta("B1", author=None, price=None, categories=[]),
      _meta("B2", price=7.5, title='Commas, "quotes" and caf\u00e9'),
      {k: v for k, v in _meta("B3").items() if k not in ("author", "price")},
      _meta("B4", author={"name": None}, price="from $3", average_rating=None),
      _meta("B5", author={"name": "  Unknown "}, title=None, rating_number=0),
      _meta("B6", author="Plain String", categories="Books"),
  ])
  books, report = _books(path)
  assert report["books"]["read"] == report["books"]["kept"] == 7
  b = books.set_index("parent_asin")
  assert b.loc["B0", "title"] == "Title B0"
  assert b.loc["B0", "author"] == "Ann Author"
  assert b.loc["B0", "categories"] == ["Books", "History"]
  assert b.loc["B0", "price"] == 12.99 and b.loc["B0", "average_rating"] == 4.5
  assert b.loc["B1", "author"] == "" and np.isnan(b.loc["B1", "price"])
  assert b.loc["B1", "categories"] == []
  assert b.loc["B2", "price"] == 7.5
  assert b.loc["B2", "title"] == 'Commas, "quotes" and caf\u00e9'
  assert b.loc["B3", "author"] == "" and np.isnan(b.loc["B3", "price"])
  assert b.loc["B4", "author"] == "" and np.isnan(b.loc["B4", "price"])
  assert b.loc["B5", "author"] == "" and b.loc["B5", "title"] == ""
  assert b.loc["B6", "author"] == "Plain String"
  assert b.loc["B6", "categories"] == ["Books"]
  price = report["invalid_values"]["price"]
  assert price["missing"] == 2 and price["non_numeric"] == 1
  assert report["repaired"]["books"] == {"malformed_list_title": 0,
                                         "malformed_list_categories": 0}


@pytest.mark.parametrize("compress", [False, True])
def test_jsonl_ingests_like_the_equivalent_csvs(dataset_writer, compress):
  # The release's files and their CSV flattening: the same items, events,
  # users, counts and splits (the JSONL events also keep the rating).
  ds = dataset_writer(size="small", ties=True)
  meta, reviews = tiny_data.write_jsonl(ds, os.path.dirname(ds.books_csv),
                                        compress,
                                        rating=lambda i: 1.0 + i % 5)
  config = ds.config(min_user_interactions=2, min_item_interactions=2)
  from_csv = ingest.run(config)
  from_jsonl = ingest.run(dataclasses.replace(config, books_csv=meta,
                                              users_csv=reviews))
  pd.testing.assert_frame_equal(from_csv.items, from_jsonl.items)
  assert list(from_jsonl.events.columns) == ["user", "item", "timestamp",
                                             "split", "rating"]
  pd.testing.assert_frame_equal(from_csv.events,
                                from_jsonl.events.drop(columns="rating"))
  np.testing.assert_array_equal(from_csv.users, from_jsonl.users)
  for key in ("books", "events", "stages", "splits", "corpus"):
    assert from_csv.report[key] == from_jsonl.report[key], key
  assert set(from_jsonl.events["rating"]) == {1.0, 2.0, 3.0, 4.0, 5.0}


def test_events_with_ratings_go_through_the_training_pipeline(
    dataset_writer, tmp_path):
  # Downstream reads events by column name: the extra rating column is
  # carried through save/load and ignored by prepare.
  from tt_mimic.config import FeatureConfig, TrainConfig  # pylint: disable=g-import-not-at-top
  from tt_mimic.training import pipeline  # pylint: disable=g-import-not-at-top
  ds = dataset_writer(size="small")
  meta, reviews = tiny_data.write_jsonl(ds, os.path.dirname(ds.books_csv))
  data = ingest.run_cached(ds.config(books_csv=meta, users_csv=reviews,
                                     min_user_interactions=2,
                                     min_item_interactions=2),
                           str(tmp_path / "run"))
  data = ingest.load(data.directory)
  assert "rating" in data.events
  prep = pipeline.prepare(data, FeatureConfig(title_length=6,
                                              history_length=5),
                          TrainConfig(batch_size=64, epochs=1,
                                      eval_max_users=50, verbose=0))
  assert len(prep.test) > 0


# ------------------------------------------------------------ bad lines


def test_malformed_lines_are_counted_and_blank_lines_are_not_rows(tmp_path):
  path = _write(tmp_path / "Books.jsonl", [
      _review("B0", "U1"), "", "   ", "{not json", '["a", "list"]', "42",
      json.dumps(_review("B1", "U1"))[:-5], _review("B1", "U2"),
      "[" * 100_000, "null", _review("B2", "U3", user_id=7)])
  events, report = _events(path)
  part = report["events"]
  assert part["read"] == 9  # the blank lines are not rows
  assert part["dropped"]["malformed_json"] == 6
  assert sorted(events["userId"].astype(str)) == ["7", "U1", "U2"]


def test_a_byte_order_mark_does_not_cost_the_first_record(tmp_path):
  path = tmp_path / "Books.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + json.dumps(_review("B0", "U1")).encode()
                   + b"\n" + json.dumps(_review("B1", "U2")).encode() + b"\n")
  events, report = _events(str(path))
  assert report["events"]["read"] == 2
  assert report["events"]["dropped"].get("malformed_json", 0) == 0
  assert sorted(events["userId"].astype(str)) == ["U1", "U2"]


def test_missing_fields_are_dropped_by_reason(tmp_path):
  review = _review("B0", "U1")
  path = _write(tmp_path / "Books.jsonl", [
      review, {k: v for k, v in review.items() if k != "user_id"},
      {k: v for k, v in review.items() if k != "parent_asin"},
      {**review, "timestamp": None}, {**review, "timestamp": "soon"},
      {**review, "user_id": "U9", "timestamp": 1.6e12},
      {**review, "user_id": "U8", "userId": "ignored"}])
  events, report = _events(path)
  dropped = report["events"]["dropped"]
  assert dropped["missing_user_id"] == 1
  assert dropped["missing_parent_asin"] == 1
  assert dropped["invalid_timestamp"] == 2
  assert sorted(events["userId"].astype(str)) == ["U1", "U8", "U9"]


def test_undecodable_bytes_and_lone_surrogates(tmp_path):
  good = json.dumps(_review("B0", "U1"))
  path = _write(tmp_path / "Books.jsonl", [
      good,
      good.replace('"U1"', '"U\xff"').encode("latin-1"),  # bad id bytes
      good.replace('"U1"', '"U\\ud800"'),  # a lone surrogate escape
      good.replace('"Good"', '"G\xe9"').replace('"U1"', '"U2"').encode(
          "latin-1"),  # bytes in a field the ingest ignores
  ])
  events, report = _events(path)
  assert report["events"]["dropped"]["invalid_utf8"] == 2
  assert len(events) == 2
  meta = json.dumps(_meta("B0"))
  path = _write(tmp_path / "meta_Books.jsonl", [
      meta.replace("Title B0", "Caf\xe9").encode("latin-1"),
      json.dumps(_meta("B1", title="\udcff"))])
  books, report = _books(path)
  assert report["repaired"]["books"]["invalid_utf8"] == 2
  assert list(books["title"]) == ["Caf\ufffd", "\ufffd"]


def test_too_large_fields_and_lines_are_dropped(tmp_path, monkeypatch):
  monkeypatch.setattr(jsonl, "LINE_LIMIT", 2000)
  monkeypatch.setattr(jsonl, "_READ", 64)
  monkeypatch.setattr(reader, "FIELD_LIMIT", 500)
  path = _write(tmp_path / "meta_Books.jsonl", [
      _meta("B0"), _meta("B1", title="t" * 1000),
      _meta("B2", description=["d" * 5000]), _meta("B3")])
  books, report = _books(path)
  dropped = {k: v for k, v in report["books"]["dropped"].items() if v}
  assert dropped == {"line_too_large": 1, "field_too_large": 1}
  assert list(books["parent_asin"]) == ["B0", "B3"]


@pytest.mark.parametrize("which", ["books", "users"])
def test_truncated_gzip_is_one_error_naming_the_file(dataset_writer, which):
  ds = dataset_writer()
  meta, reviews = tiny_data.write_jsonl(ds, os.path.dirname(ds.books_csv),
                                        compress=True)
  path = meta if which == "books" else reviews
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) * 2 // 3])
  with pytest.raises(ingest.IngestError, match="truncated or corrupt") as e:
    ingest.run(ds.config(books_csv=meta, users_csv=reviews))
  assert path in str(e.value) and "\n" not in str(e.value)


def test_empty_and_missing_files_are_errors(tmp_path):
  empty = _write(tmp_path / "meta_Books.jsonl", [])
  with pytest.raises(ingest.IngestError, match="is empty"):
    _books(empty)
  with pytest.raises(ingest.IngestError, match="not found"):
    _books(tmp_path / "nope.jsonl")


# ------------------------------------------------ format and --min_rating


def test_format_by_name_or_flag(tmp_path):
  config = IngestConfig()
  for name, fmt in (("Books.jsonl", "jsonl"), ("Books.JSONL.GZ", "jsonl"),
                    ("b.json", "jsonl"), ("b.ndjson.gz", "jsonl"),
                    ("books.csv", "csv"), ("books.csv.gz", "csv"),
                    ("books.txt", "csv")):
    assert ingest.input_format(config, name) == fmt, name
  forced = IngestConfig(input_format="jsonl")
  assert ingest.input_format(forced, "books.txt") == "jsonl"
  path = _write(tmp_path / "meta.txt", [_meta("B0")])
  books, _ = _books(path, input_format="jsonl")
  assert list(books["parent_asin"]) == ["B0"]
  with pytest.raises(ValueError, match="input_format"):
    IngestConfig(input_format="xml")


def test_min_rating_drops_by_reason(tmp_path):
  path = _write(tmp_path / "Books.jsonl", [
      _review("B0", "U1", rating=5.0), _review("B1", "U1", rating=3.0),
      _review("B2", "U1", rating=None), _review("B0", "U2", rating="bad"),
      {k: v for k, v in _review("B1", "U2").items() if k != "rating"},
      _review("B2", "U2", rating=4)])
  events, report = _events(path)
  assert len(events) == 6 and "rating" in events
  events, report = _events(path, min_rating=4.0)
  dropped = report["events"]["dropped"]
  assert dropped["below_min_rating"] == 1 and dropped["missing_rating"] == 3
  assert sorted(events["rating"]) == [4.0, 5.0]
  assert report["invalid_values"]["rating"]["non_numeric"] == 1


def test_min_rating_with_csv_files(dataset_writer):
  ds = dataset_writer()
  with pytest.raises(ingest.IngestError, match="needs ratings") as e:
    ingest.run(ds.config(min_rating=3.0))
  assert ds.users_csv in str(e.value)
  rated = ds.events.assign(rating=np.arange(len(ds.events)) % 5 + 1)
  users = os.path.join(os.path.dirname(ds.users_csv), "rated.csv")
  rated.to_csv(users, index=False)
  result = ingest.run(ds.config(users_csv=users, min_rating=3.0))
  assert result.report["events"]["dropped"]["below_min_rating"] == (
      rated["rating"] < 3).sum()
  assert (result.events["rating"] >= 3).all()


def test_cache_key_covers_the_new_settings(dataset_writer):
  ds = dataset_writer()
  keys = {ingest.cache_key(ds.config(**kw)) for kw in (
      {}, {"min_rating": 4.0}, {"input_format": "csv"})}
  assert len(keys) == 3


# ------------------------------------------------------------- fuzz tests

_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(
        max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=4), inner, max_size=3), max_leaves=6)
_FIELDS = ("parent_asin", "user_id", "timestamp", "rating", "title",
           "author", "price", "categories", "average_rating",
           "rating_number")
_RECORD = st.dictionaries(
    st.sampled_from(_FIELDS), _VALUE | st.sampled_from(
        ["B0", "B1", "U1", 1_600_000_000_000, "$12.99", {"name": "A"}]),
    max_size=8)
_LINE = st.one_of(_RECORD, st.binary(max_size=20), st.sampled_from(
    ["", "{", "[]", "null", '{"parent_asin": "B0"', b"\xff{}", "\r"]))


@settings(max_examples=80, deadline=None)
@given(lines=st.lists(_LINE, max_size=12), compress=st.booleans(),
       truncate=st.integers(0, 4), limit=st.sampled_from([6, 4096]))
# Found by the fuzzer: a first line that is only a byte order mark is blank.
@example(lines=[b"\xef\xbb\xbf", {}], compress=False, truncate=0, limit=6)
def test_fuzz_lines_never_crash_and_counts_add_up(lines, compress, truncate,
                                                  limit):
  with tempfile.TemporaryDirectory() as directory, \
      pytest.MonkeyPatch.context() as patch:
    patch.setattr(reader, "FIELD_LIMIT", limit)
    for name, check in (("meta_Books.jsonl", _books),
                        ("Books.jsonl", _events)):
      path = os.path.join(directory, name)
      _write(path, [x if not isinstance(x, bytes) else x.replace(b"\n", b"")
                    for x in lines], compress)
      if truncate and compress:
        with open(path, "rb") as f:
          data = f.read()
        with open(path, "wb") as f:
          f.write(data[:-truncate])
      try:
        _, report = check(path)
      except ingest.IngestError:
        continue
      part = report["books" if name.startswith("meta") else "events"]
      if not (truncate and compress):
        def text(i, x):
          if isinstance(x, dict):
            return json.dumps(x)
          if isinstance(x, bytes):
            x = x.replace(b"\n", b"")
            if i == 0 and x.startswith(b"\xef\xbb\xbf"):
              x = x[3:]  # the reader drops a byte order mark at the start
            return x.decode("utf-8", "surrogateescape")
          return x
        rows = sum(1 for i, x in enumerate(lines) if text(i, x).strip())
        assert part["read"] == rows
