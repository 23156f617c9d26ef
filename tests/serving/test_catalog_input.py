"""The catalog's new-books file on bad input (issue 12): read_new_books.

No model is needed: the file is read before any export is touched.
"""

import json

import pytest

import tiny_data
from tt_mimic.data import ingest
from tt_mimic.serving import catalog


def _rows(n):
  return [[f"N{i}", json.dumps([f"New {i}"]), "A", "4", "1", "2",
           '["Books"]'] for i in range(n)]


def test_truncated_gzip_new_books_is_one_error_naming_the_file(tmp_path):
  # Was: EOFError traceback from `tt-mimic catalog`.
  path = tiny_data.write_rows(tmp_path / "new.csv.gz", ingest.BOOK_COLUMNS,
                              _rows(500), compress=True, truncate=40)
  with pytest.raises(ingest.IngestError, match="truncated or corrupt") as e:
    catalog.read_new_books(path)
  assert path in str(e.value) and "\n" not in str(e.value)


def test_bad_new_book_rows_are_counted(tmp_path):
  rows = _rows(4)
  rows[0][1] = "t" * 200_000  # oversized: dropped
  rows[1][0] = b"N\xff"  # undecodable id: dropped
  rows[2] = rows[2][:3]  # ragged: dropped
  path = tiny_data.write_rows(tmp_path / "new.csv", ingest.BOOK_COLUMNS,
                              rows)
  books, counts = catalog.read_new_books(path)
  assert list(books["parent_asin"]) == ["N3"]
  assert counts["read"] == 4 and counts["kept"] == 1
  assert counts["dropped"] == {"malformed_row": 1, "field_too_large": 1,
                               "invalid_utf8": 1,
                               "missing_parent_asin": 0,
                               "duplicate_parent_asin": 0}
