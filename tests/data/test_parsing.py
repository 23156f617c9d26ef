"""Tests for tt_mimic.data.parsing, directly and through ingest's CSV
reading."""

import csv
import json

import numpy as np
import pandas as pd
import pytest

from tt_mimic.config import IngestConfig
from tt_mimic.data import ingest
from tt_mimic.data import parsing


def _lists(*cells):
  return parsing.parse_json_list(pd.Series(list(cells), dtype=object))[0]


@pytest.mark.parametrize("cell, expected", [
    # well-formed JSON lists
    ('["Books", "Literature & Fiction", "History & Criticism"]',
     ["Books", "Literature & Fiction", "History & Criticism"]),
    ('["Chaucer"]', ["Chaucer"]),
    # nested quotes and commas inside an element (JSON-escaped)
    ('["He said \\"hi\\", then left", "x, y"]',
     ['He said "hi", then left', "x, y"]),
    # Python-repr lists
    ("['a', 'b']", ["a", "b"]),
    ("['It\\'s, \"quoted\"']", ["It's, \"quoted\""]),
    # empty lists, None / null and friends
    ("[]", []), ("", []), ("   ", []), ("None", []), ("null", []),
    ("NULL", []), ("nan", []), ("[null]", []), ('["", " "]', []),
    # plain strings are one element
    ("plain title", ["plain title"]),
    ("Books, with a comma", ["Books, with a comma"]),
    ('"a json string"', ["a json string"]),
    # malformed JSON never raises
    ('["a", "b"', ['["a", "b"']),
    ('["a", "b",]', ["a", "b"]),
    ('["broken "inner" quote", "b"]', ['broken "inner" quote', "b"]),
    ("[unquoted, words]", ["unquoted, words"]),
    ('{"a": 1}', []),
    ("{not json", ["{not json"]),
    # non-string elements
    ("[1, 2]", ["1", "2"]),
    ('[["a", "b"], "c"]', ["a", "b", "c"]),
])
def test_parse_json_list_cases(cell, expected):
  assert _lists(cell) == [expected]


def test_parse_json_list_handles_non_string_cells():
  out = parsing.parse_json_list(pd.Series([None, np.nan, 3], dtype=object))
  assert out == ([[], [], ["3"]], 0)


MALFORMED = ['["a", "b"', '["broken "inner" quote", "b"]', "[unquoted, words]",
             '{"a": 1}', "{not json", "[" * 100_000, '["a"] trailing']
WELL_FORMED = ['["Books", "x"]', "['a', 'b']", '["a", "b",]', "[]", "",
               "None", "plain, title", '"a json string"', '"Quoted" title',
               "[1, 2]"]


def test_parse_json_list_counts_malformed_cells():
  # Malformed cells are kept as the cases above show, and counted.
  for cell in MALFORMED:
    assert parsing.parse_json_list(pd.Series([cell]))[1] == 1, cell
  for cell in WELL_FORMED:
    assert parsing.parse_json_list(pd.Series([cell]))[1] == 0, cell
  lists, malformed = parsing.parse_json_list(
      pd.Series(MALFORMED + WELL_FORMED))
  assert malformed == len(MALFORMED) and len(lists) == len(MALFORMED) + len(
      WELL_FORMED)
  titles, malformed = parsing.parse_title(pd.Series(MALFORMED + WELL_FORMED))
  assert malformed == len(MALFORMED) and len(titles) == len(lists)


@pytest.mark.parametrize("cell, expected", [
    ('["Chaucer"]', "Chaucer"),
    ('["The Canterbury Tales", "Vol. 1"]', "The Canterbury Tales Vol. 1"),
    ('["He said \\"hi\\", then left"]', 'He said "hi", then left'),
    ("['Python, repr']", "Python, repr"),
    ("A plain, title", "A plain, title"),
    ("[]", ""), ("", ""), ("None", ""), ("null", ""),
    ('["unterminated', '["unterminated'),
])
def test_parse_title_cases(cell, expected):
  out, _ = parsing.parse_title(pd.Series([cell], dtype=object))
  assert out.dtype == object
  assert out.tolist() == [expected]


@pytest.mark.parametrize("cell, expected", [
    ("  Jane   Austen ", "Jane Austen"),
    ("Unknown", ""), ("unknown author", ""), ("None", ""), ("null", ""),
    ("", ""), ('{"name": "Ann Author", "about": []}', "Ann Author"),
    ("{broken", "{broken"),
])
def test_clean_author_cases(cell, expected):
  assert parsing.clean_author(pd.Series([cell])).tolist() == [expected]


def test_parse_nonnegative_values_and_counts():
  cells = ["4.5", " 2 ", "$3.99", "1e3", "0",  # valid
           "", "None", "null", "nan",  # missing
           "abc", "1,000", "12 USD",  # non_numeric
           "-1", "-0.5",  # negative
           "inf", "Infinity"]  # non_finite
  values, counts = parsing.parse_nonnegative(pd.Series(cells))
  assert values.dtype == np.float64
  np.testing.assert_array_equal(values[:5], [4.5, 2.0, 3.99, 1000.0, 0.0])
  assert np.isnan(values[5:]).all()
  assert counts == {"missing": 4, "non_numeric": 3, "negative": 2,
                    "non_finite": 2}


def test_parse_nonnegative_counts_each_cell_once():
  values, counts = parsing.parse_nonnegative(
      pd.Series(["-inf", "inf", "-1", "x", "", "1"]))
  assert sum(counts.values()) == int(np.isnan(values).sum()) == 5


def _write_books(path, rows, header=ingest.BOOK_COLUMNS):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def test_ingest_parses_messy_fields_and_counts_invalid_values(tmp_path):
  # parent_asin, title, author, average_rating, rating_number, price,
  # categories -- written with the csv module, so quotes inside cells are
  # doubled exactly as in a real export.
  rows = [
      ("A1", json.dumps(['He said "hi", then, left']), "  Ann  Author ",
       "4.5", "12", "3.99", '["Books", "Literature & Fiction"]'),
      ("A2", "['Python', 'repr, list']", "Unknown", "", "None", "null",
       "['Books', 'Mystery, Thriller & Suspense']"),
      ("A3", "plain, comma title", "", "abc", "-3", "inf", "[]"),
      ("A4", '["broken', "null", "None", "7", "-0.01", "None"),
      ("A5", "[]", '{"name": "Bo"}', "5", "1e2", "$4", "not a list"),
  ]
  _write_books(tmp_path / "books.csv", rows)
  pd.DataFrame({"parent_asin": ["A1", "A2", "A3", "A4", "A5"],
                "userId": ["u"] * 5,
                "timestamp": [1_600_000_000_000 + i for i in range(5)],
                }).to_csv(tmp_path / "users.csv", index=False)
  result = ingest.run(IngestConfig(
      str(tmp_path / "books.csv"), str(tmp_path / "users.csv"),
      min_user_interactions=1, min_item_interactions=1))
  items = result.items.set_index("parent_asin")
  assert items["title"].to_dict() == {
      "A1": 'He said "hi", then, left', "A2": "Python repr, list",
      "A3": "plain, comma title", "A4": '["broken', "A5": ""}
  assert items["author"].to_dict() == {
      "A1": "Ann Author", "A2": "", "A3": "", "A4": "", "A5": "Bo"}
  assert items["categories"].to_dict() == {
      "A1": ["Books", "Literature & Fiction"],
      "A2": ["Books", "Mystery, Thriller & Suspense"],
      "A3": [], "A4": [], "A5": ["not a list"]}
  np.testing.assert_array_equal(items["average_rating"],
                                [4.5, np.nan, np.nan, np.nan, 5.0])
  np.testing.assert_array_equal(items["rating_number"],
                                [12.0, np.nan, np.nan, 7.0, 100.0])
  np.testing.assert_array_equal(items["price"],
                                [3.99, np.nan, np.nan, np.nan, 4.0])
  for column in ingest.NUMERIC_COLUMNS:
    assert items[column].dtype == np.float64
  invalid = result.report["invalid_values"]
  assert invalid["average_rating"] == {
      "missing": 2, "non_numeric": 1, "negative": 0, "non_finite": 0}
  assert invalid["rating_number"] == {
      "missing": 1, "non_numeric": 0, "negative": 1, "non_finite": 0}
  assert invalid["price"] == {
      "missing": 1, "non_numeric": 0, "negative": 1, "non_finite": 1}
  assert "price=" in ingest.summary(result.report)
  # '["broken' is the one malformed list cell: kept as text, and counted
  assert result.report["repaired"]["books"] == {
      "malformed_list_title": 1, "malformed_list_categories": 0}
