"""Tests for tt_mimic.data.reader and ingest on bad input (issue 12).

Each observed failure is reproduced (a huge title, undecodable bytes, a
truncated gzip, timestamps in seconds or in the future, malformed list
cells, a repeated header column); then a property-based fuzz test writes
arbitrary cells and bytes as books/users files.
"""

import csv
import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
import time

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import pandas as pd
import pyarrow as pa
import pytest

import tiny_data
from tt_mimic.data import ingest
from tt_mimic.data import reader

BOOKS, EVENTS = ingest.BOOK_COLUMNS, ingest.EVENT_COLUMNS


def _book(asin, title=None, categories='["Books"]'):
  title = json.dumps([f"Title {asin}"]) if title is None else title
  return [asin, title, "Someone", "4.0", "3", "9.99", categories]


def _counts_add_up(part):
  assert part["read"] == part["kept"] + sum(part["dropped"].values()), part


def _books_report(path):
  report = ingest.Report()
  books = ingest.read_books(
      ingest.IngestConfig(books_csv=str(path), users_csv="", books_limit=0),
      report)
  _counts_add_up(report.data["books"])
  return books, report.data


def _pyarrow_fails(*args):
  """Stands in for reader._read_fast: read_csv takes its Python csv path."""
  del args
  raise pa.ArrowInvalid("forced by the test")


# ----------------------------------------------------- the observed failures


@pytest.mark.parametrize("path", ["fast", "slow"])
@pytest.mark.parametrize("row", [0, 5])
def test_oversized_field_drops_the_row(tmp_path, monkeypatch, path, row):
  # Was: "field larger than field limit (131072)" aborted ingest.
  if path == "slow":
    monkeypatch.setattr(reader, "_read_fast", _pyarrow_fails)
  rows = [_book(f"B{i}") for i in range(8)]
  rows[row][1] = json.dumps(["x" * 200_000])
  books, report = _books_report(tiny_data.write_rows(
      tmp_path / "books.csv", BOOKS, rows))
  assert report["books"]["read"] == 8 and report["books"]["kept"] == 7
  assert report["books"]["dropped"]["field_too_large"] == 1
  assert f"B{row}" not in set(books["parent_asin"])


def test_field_at_the_limit_is_kept(tmp_path):
  title = "y" * reader.FIELD_LIMIT
  books, report = _books_report(tiny_data.write_rows(
      tmp_path / "books.csv", BOOKS, [_book("A", title), _book("B")]))
  assert report["books"]["kept"] == 2 and books["title"][0] == title


def test_undecodable_bytes_repair_books_and_drop_events(dataset_writer):
  # Was: 20 rows with non-UTF-8 bytes aborted ingest with a codec error.
  ds = dataset_writer(n_users=40, n_items=30, events_per_user=3)
  directory = os.path.dirname(ds.books_csv)
  books = ds.books.astype(str).to_numpy().tolist()
  for i in range(20):  # Latin-1 titles: repaired, the books kept
    books[i][1] = json.dumps([f"Caf\u00e9 {i}"],
                             ensure_ascii=False).encode("latin-1")
  books[25][0] = b"\xff" + books[25][0].encode()  # a bad id: dropped
  books_csv = tiny_data.write_rows(os.path.join(directory, "b.csv"),
                                   BOOKS, books)
  events = ds.events.astype(str).to_numpy().tolist()
  for i in range(20):
    events[i][1] = events[i][1].encode() + b"\xe9"
  users_csv = tiny_data.write_rows(os.path.join(directory, "u.csv"),
                                   EVENTS, events)
  result = ingest.run(ds.config(books_csv=books_csv, users_csv=users_csv))
  report = result.report
  assert report["books"]["dropped"]["invalid_utf8"] == 1
  assert report["repaired"]["books"]["invalid_utf8"] == 20
  assert report["events"]["dropped"]["invalid_utf8"] == 20
  assert report["events"]["read"] == len(events)
  titles = result.items["title"]
  assert titles.str.contains("Caf\ufffd").sum() == titles.str.startswith(
      "Caf").sum() > 0
  assert "kept after repair (invalid_utf8=20" in ingest.summary(report)


@pytest.mark.parametrize("which", ["books", "users"])
def test_truncated_gzip_is_an_error_naming_the_file(dataset_writer, which):
  # Was: EOFError traceback.
  ds = dataset_writer(suffix=".csv.gz")
  path = ds.books_csv if which == "books" else ds.users_csv
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) * 2 // 3])
  with pytest.raises(ingest.IngestError, match="truncated or corrupt") as e:
    ingest.run(ds.config())
  assert path in str(e.value) and "\n" not in str(e.value)


def test_corrupt_gzip_and_gzip_named_csv(tmp_path):
  rows = [_book(f"B{i}") for i in range(2000)]
  good = tiny_data.write_rows(tmp_path / "books.csv", BOOKS, rows,
                              compress=True)  # gzip bytes, .csv name
  books, _ = _books_report(good)
  assert len(books) == 2000
  with open(good, "rb") as f:
    data = bytearray(f.read())
  data[len(data) // 2:len(data) // 2 + 64] = b"\x00" * 64
  bad = tmp_path / "corrupt.csv.gz"
  bad.write_bytes(bytes(data))
  with pytest.raises(ingest.IngestError, match="truncated or corrupt"):
    _books_report(bad)


def test_truncated_gzip_via_the_ingest_command_is_one_line(dataset_writer,
                                                           tmp_path):
  ds = dataset_writer(suffix=".csv.gz")
  with open(ds.users_csv, "rb") as f:
    data = f.read()
  truncated = str(tmp_path / "cut.csv.gz")
  with open(truncated, "wb") as f:
    f.write(data[:-20])
  proc = subprocess.run(
      [sys.executable, "-m", "tt_mimic", "ingest",
       f"--books_csv={ds.books_csv}", f"--users_csv={truncated}",
       f"--model_dir={tmp_path / 'run'}"],
      capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("ingest failed: Cannot read users file")
  assert truncated in last and "truncated or corrupt" in last


def test_timestamps_in_seconds_are_refused(dataset_writer):
  ds = dataset_writer()
  users = tiny_data.write_rows(
      os.path.dirname(ds.users_csv) + "/seconds.csv", EVENTS,
      ds.events.assign(timestamp=ds.events["timestamp"] // 1000)
      .astype(str).to_numpy().tolist())
  with pytest.raises(ingest.IngestError, match="look|seconds") as e:
    ingest.run(ds.config(users_csv=users))
  assert users in str(e.value) and "multiply it by 1000" in str(e.value)


def test_early_and_future_timestamps_are_dropped(dataset_writer):
  ds = dataset_writer()
  events = ds.events.astype(str).to_numpy().tolist()
  now = int(time.time() * 1000)
  events[0][2] = str(1_600_000_000)  # one row in seconds
  events[1][2] = "0"
  events[2][2] = str(now + 10 * 86_400_000)  # ten days ahead
  events[3][2] = str(now + 3600_000)  # within the day of slack
  events[4][2] = "4102444800000"  # 2100-01-01
  users = tiny_data.write_rows(
      os.path.dirname(ds.users_csv) + "/times.csv", EVENTS, events)
  result = ingest.run(ds.config(users_csv=users))
  dropped = result.report["events"]["dropped"]
  assert dropped["timestamp_before_1973"] == 2
  assert dropped["timestamp_in_future"] == 2
  assert result.report["events"]["kept"] == len(events) - 4
  assert (result.events["timestamp"] >= ingest.MIN_TIMESTAMP_MS).all()


def test_malformed_list_cells_are_counted_as_repaired(tmp_path):
  rows = [_book("A", categories='["Books", "Myst'),
          _book("B", title='["Half a title'),
          _book("C", categories='{"not": "a list"}'),
          _book("D", categories="['Books', 'Python repr']")]
  books, report = _books_report(tiny_data.write_rows(
      tmp_path / "books.csv", BOOKS, rows))
  assert report["repaired"]["books"] == {"malformed_list_title": 1,
                                         "malformed_list_categories": 2}
  assert report["books"]["kept"] == 4  # repaired rows are kept
  categories = dict(zip(books["parent_asin"], books["categories"]))
  assert categories["C"] == [] and categories["D"] == ["Books",
                                                       "Python repr"]


@pytest.mark.parametrize("header, repeated", [
    (list(BOOKS) + ["title"], "title"),
    (list(BOOKS) + [" price "], "price"),
    (list(BOOKS) + ["extra", "extra"], "extra"),
])
def test_repeated_header_column_is_an_error_naming_it(tmp_path, header,
                                                      repeated):
  path = tiny_data.write_rows(tmp_path / "books.csv", header,
                              [_book("A") + ["x"] * (len(header) - 7)])
  with pytest.raises(ingest.IngestError, match="repeats column") as e:
    _books_report(path)
  assert f"['{repeated}']" in str(e.value) and path in str(e.value)


def test_unnamed_columns_are_not_repeats(tmp_path):
  path = tiny_data.write_rows(tmp_path / "books.csv", [""] + list(BOOKS) + [""],
                              [["0"] + _book("A") + ["z"]])
  books, _ = _books_report(path)
  assert list(books["parent_asin"]) == ["A"]


# ------------------------------------------------ the Python csv fallback


def _messy_rows():
  rows = [_book(f"B{i}") for i in range(30)]
  rows[1][1] = json.dumps(["line one\nline two, \"quoted\""])
  rows[2] = rows[2][:5]  # short
  rows[3] = rows[3] + ["surplus"]
  rows[4][0] = b"B4\xff"  # undecodable id: dropped
  rows[5][2] = b"Caf\xe9"  # undecodable author: repaired
  rows[6][1] = "z" * (reader.FIELD_LIMIT + 1)
  rows[7][1] = "\x00nul\rcr"
  return rows


def test_python_path_counts_as_the_pyarrow_path(tmp_path, monkeypatch):
  path = tiny_data.write_rows(tmp_path / "books.csv", BOOKS, _messy_rows())
  fast = reader.read_csv(path, BOOKS, "books", ("parent_asin",))
  monkeypatch.setattr(reader, "_read_fast", _pyarrow_fails)
  slow = reader.read_csv(path, BOOKS, "books", ("parent_asin",))
  assert fast.dropped == slow.dropped == {
      "malformed_row": 2, "field_too_large": 1, "invalid_utf8": 1}
  assert fast.repaired == slow.repaired == {"invalid_utf8": 1}
  assert fast.frame.equals(slow.frame) and len(fast.frame) == 26
  assert fast.frame["title"][1] == json.dumps(
      ["line one\nline two, \"quoted\""])
  authors = dict(zip(fast.frame["parent_asin"], fast.frame["author"]))
  assert authors["B5"] == "Caf\ufffd" and "B4\ufffd" not in authors


def test_row_longer_than_a_block_and_runaway_quote(tmp_path):
  # A 9 MB cell in an ignored column is longer than pyarrow's block: the
  # Python path reads the file, keeps that row (the cell is not required).
  header = list(BOOKS) + ["description"]
  rows = [_book(f"B{i}") + ["d"] for i in range(5)]
  rows[2][-1] = "D" * (9 << 20)
  path = tiny_data.write_rows(tmp_path / "books.csv", header, rows)
  books, report = _books_report(path)
  assert report["books"]["read"] == report["books"]["kept"] == 5
  # An unterminated quote swallows the lines after it: each is counted.
  text = "\n".join([",".join(BOOKS)] + [
      ",".join(_book(f"C{i}")).replace('"', "") for i in range(6)])
  text = text.replace(",[Title C2]", ',"[Title C2]', 1) + "\n"
  path = tmp_path / "runaway.csv"
  path.write_text(text)
  books, report = _books_report(path)
  assert list(books["parent_asin"]) == ["C0", "C1"]
  assert report["books"]["dropped"]["malformed_row"] == 4


# ------------------------------------------------------------- fuzz tests

_CELL = st.one_of(
    st.text(max_size=12),
    st.binary(max_size=12),
    st.sampled_from(['["Books", "x"]', '["broken', "[]", "", "None", '"',
                     "\n", "\r\n", "\r", "1600000000000", "-1", "inf",
                     "1e30", b"\xff\xfe", "\x00", '{"a": 1}', "[" * 50,
                     "x" * 40]))
_ROWS = st.lists(st.lists(_CELL, min_size=5, max_size=9), max_size=12)
_KNOWN = pd.Index([f"B{i}" for i in range(5)])


def _records(rows, width):
  """The rows read = kept + dropped should count: a record per row of the
  right width, and per physical line of the others (see reader)."""
  total = 0
  for row in rows:
    if len(row) == width:
      total += 1
    else:
      text = io.StringIO()
      csv.writer(text).writerow(  # as tiny_data.write_rows writes it
          [c.decode("utf-8", "surrogateescape") if isinstance(c, bytes)
           else c for c in row])
      line = text.getvalue()[:-2]  # without its "\r\n"
      total += reader._lines(line)  # pylint: disable=protected-access
  return total


def _check_events(users_csv):
  """read_events on the file: counts add up, or a documented IngestError."""
  report = ingest.Report()
  config = ingest.IngestConfig(books_csv="", users_csv=users_csv,
                               interactions_limit=0)
  try:
    events = ingest.read_events(config, _KNOWN, report)
  except ingest.IngestError:
    return None
  part = report.data["events"]
  assert part["read"] == len(events) + sum(part["dropped"].values()), part
  return part["read"]


@settings(max_examples=60, deadline=None)
@given(rows=_ROWS, compress=st.booleans(),
       limit=st.sampled_from([8, reader.FIELD_LIMIT]))
def test_fuzz_cells_never_crash_and_counts_add_up(rows, compress, limit):
  with tempfile.TemporaryDirectory() as directory, \
      pytest.MonkeyPatch.context() as patch:
    patch.setattr(reader, "FIELD_LIMIT", limit)  # 8: huge cells are cheap
    books = tiny_data.write_rows(os.path.join(directory, "books.csv"),
                                 BOOKS, rows, compress)
    _, report = _books_report(books)
    assert report["books"]["read"] == _records(rows, len(BOOKS))
    events = [r[:3] for r in rows[::2]] + rows[1::2]
    users = tiny_data.write_rows(os.path.join(directory, "users.csv"),
                                 EVENTS, events, compress)
    read = _check_events(users)
    assert read in (None, _records(events, len(EVENTS)))


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300), header=st.booleans(),
       compress=st.booleans(), truncate=st.integers(0, 5))
def test_fuzz_bytes_never_crash_and_counts_add_up(data, header, compress,
                                                 truncate):
  with tempfile.TemporaryDirectory() as directory:
    for name, columns in (("books.csv", BOOKS), ("users.csv", EVENTS)):
      raw = ((",".join(columns) + "\n").encode() if header else b"") + data
      if compress:
        raw = gzip.compress(raw, mtime=0)
        raw = raw[:len(raw) - truncate]
      path = os.path.join(directory, name)
      with open(path, "wb") as f:
        f.write(raw)
      if name == "users.csv":
        _check_events(path)
        continue
      try:
        _books_report(path)
      except ingest.IngestError:
        pass


@settings(max_examples=50, deadline=None)
@given(rows=_ROWS)
def test_fuzz_both_parsers_read_alike(rows):
  # pyarrow and the Python csv path: the same frame and the same counts.
  with tempfile.TemporaryDirectory() as directory, \
      pytest.MonkeyPatch.context() as patch:
    patch.setattr(reader, "FIELD_LIMIT", 30)
    path = tiny_data.write_rows(os.path.join(directory, "books.csv"),
                                BOOKS, rows)
    fast = reader.read_csv(path, BOOKS, "books", ("parent_asin",))
    patch.setattr(reader, "_read_fast", _pyarrow_fails)
    slow = reader.read_csv(path, BOOKS, "books", ("parent_asin",))
  assert fast.dropped == slow.dropped
  assert fast.repaired == slow.repaired
  assert fast.frame.equals(slow.frame)
  assert len(fast.frame) + sum(fast.dropped.values()) == _records(rows, 7)
