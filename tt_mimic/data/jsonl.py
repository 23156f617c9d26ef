"""Reads the official Amazon Reviews 2023 JSONL files, counting every bad line.

The release ships one JSON object per line, plain or gzipped:

  Books.jsonl       reviews: rating, title, text, asin, parent_asin,
                    user_id, timestamp (epoch ms), helpful_vote,
                    verified_purchase
  meta_Books.jsonl  books: title (a string), subtitle, author (an object
                    with a name, or null/missing), average_rating,
                    rating_number, price ("$12.99", a number or null),
                    categories (a list, may be empty), details, parent_asin

`read_jsonl` turns the fields it is asked for into the very cells the CSV
path reads (`reader.read_csv`): a title string becomes a one-element JSON
list, an author object its name, a list a JSON list, a number its text and
null an empty cell. The frame then goes through the same parsing and
validation in `ingest`, so a JSONL file and its CSV flattening ingest to
the same books and events. Each `Column` names its JSON keys (the first
present is used) and how a value becomes a cell.

Dropped lines, by reason, in the `reader.ReadResult`:

  malformed_json    a line that is not JSON, or JSON that is not an object.
  line_too_large    a line over LINE_LIMIT bytes (it is skipped unread, so
                    memory stays bounded).
  field_too_large, invalid_utf8   as for CSVs (`reader.to_frame`): a cell
                    over FIELD_LIMIT bytes; undecodable bytes (or a lone
                    surrogate escape) in a key column drop the line, and
                    elsewhere are replaced and the line counted as repaired.

Blank lines are not rows, so `read = len(frame) + sum(dropped)`. A missing
file, an empty one and a truncated or corrupt gzip stream are an
`IngestError` naming the file, in one line. The reader streams: it holds
the asked-for cells of the whole file (as the CSV path does), one line at
a time besides, in Arrow chunks of 256K rows.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

import pyarrow as pa

from tt_mimic.data import reader

LINE_LIMIT = 64 << 20  # bytes; a longer line is dropped without reading it
_CHUNK_ROWS = 1 << 18
_READ = 1 << 20  # bytes read at a time while skipping a too-long line


def _text(value) -> str:
  """A scalar as the CSV cell holding it; null -> ''."""
  if value is None:
    return ""
  if isinstance(value, str):
    return value
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (int, float)):
    return repr(value)
  return json.dumps(value, ensure_ascii=False)


def _as_list(value) -> str:
  """A list (categories) as a JSON list cell."""
  if isinstance(value, list):
    return json.dumps(value, ensure_ascii=False)
  return _text(value)


def _title(value) -> str:
  """A title string as the CSV's one-element JSON list."""
  if isinstance(value, str):
    return json.dumps([value], ensure_ascii=False)
  return _as_list(value)


def _author(value) -> str:
  """An author object ({"name": ...}) as its name; null/missing -> ''."""
  if isinstance(value, dict):
    return _text(value.get("name"))
  return _text(value)


@dataclasses.dataclass(frozen=True)
class Column:
  """One column of the frame: the JSON keys it is read from and the cell."""
  keys: tuple[str, ...]
  cell: Callable[[object], str] = _text


BOOK_COLUMNS = {
    "parent_asin": Column(("parent_asin",)),
    "title": Column(("title",), _title),
    "author": Column(("author",), _author),
    "average_rating": Column(("average_rating",)),
    "rating_number": Column(("rating_number",)),
    "price": Column(("price",)),
    "categories": Column(("categories",), _as_list),
}
EVENT_COLUMNS = {
    "parent_asin": Column(("parent_asin",)),
    "userId": Column(("user_id", "userId")),
    "timestamp": Column(("timestamp",)),
}
RATING = Column(("rating",))


def _lines(raw):
  """Yields (line bytes or None for a line over LINE_LIMIT) per line."""
  while True:
    line = raw.readline(LINE_LIMIT + 1)
    if not line:
      return
    if len(line) > LINE_LIMIT and not line.endswith(b"\n"):
      while True:  # skip the rest of the line without holding it
        rest = raw.readline(_READ)
        if not rest or rest.endswith(b"\n"):
          break
      yield None
      continue
    yield line


def _encode(cell: str) -> bytes:
  """A cell's bytes; undecodable input stays undecodable (see to_frame)."""
  try:
    return cell.encode("utf-8", "surrogateescape")
  except UnicodeEncodeError:  # a lone surrogate escaped in the JSON text
    return cell.encode("utf-8", "surrogatepass")


class _Columns:
  """Cells gathered in Arrow chunks (bounded Python lists)."""

  def __init__(self, names):
    self.names = list(names)
    self.rows = [[] for _ in self.names]
    self.chunks = [[] for _ in self.names]
    self.count = 0

  def add(self, cells) -> None:
    for row, cell in zip(self.rows, cells):
      row.append(cell)
    self.count += 1
    if len(self.rows[0]) >= _CHUNK_ROWS:
      self.flush()

  def flush(self) -> None:
    for chunk, row in zip(self.chunks, self.rows):
      chunk.append(pa.array(row, pa.binary()))
      row.clear()

  def table(self, names) -> pa.Table:
    self.flush()
    return pa.table({n: pa.chunked_array(self.chunks[self.names.index(n)],
                                         pa.binary()) for n in names})


def _read(path: str, gz: bool, columns: dict, optional: dict):
  """Streams the file: (cells table, optional names seen, dropped counts)."""
  every = {**columns, **optional}
  out = _Columns(every)
  seen = set()
  dropped = {"malformed_json": 0, "line_too_large": 0}
  with reader.open_binary(path, gz) as raw:
    for number, line in enumerate(_lines(raw)):
      if line is None:
        dropped["line_too_large"] += 1
        continue
      if number == 0 and line.startswith(b"\xef\xbb\xbf"):
        line = line[3:]  # a UTF-8 byte order mark, as the CSV path allows
      try:
        text = line.decode("utf-8")
      except UnicodeDecodeError:
        text = line.decode("utf-8", "surrogateescape")
      if not text.strip():
        continue  # blank line: not a row
      try:
        record = json.loads(text)
      except (ValueError, RecursionError):
        record = None
      if not isinstance(record, dict):
        dropped["malformed_json"] += 1
        continue
      cells = []
      for name, column in every.items():
        key = next((k for k in column.keys if k in record), None)
        if key is not None and name in optional:
          seen.add(name)
        value = None if key is None else record[key]
        cells.append(_encode(column.cell(value)))
      out.add(cells)
  names = list(columns) + [n for n in optional if n in seen]
  return out.table(names), names, dropped


def read_jsonl(path: str, columns: dict, what: str, keys: tuple[str, ...] = (),
               optional: dict | None = None) -> reader.ReadResult:
  """Reads JSON Lines into the CSV path's text columns.

  Args:
    path: the file, plain or gzip (recognised by its magic bytes).
    columns: frame column -> `Column` (BOOK_COLUMNS or EVENT_COLUMNS); a
      key missing from a line gives an empty cell.
    what: "books" or "users", for the messages.
    keys: columns in which undecodable text drops the line.
    optional: columns in the frame only when some line has their key
      (e.g. {"rating": RATING}).

  Returns:
    A `reader.ReadResult` (see the module docstring for the reasons).

  Raises:
    IngestError: no such file, an empty file, a truncated or corrupt gzip.
  """
  try:
    gz = reader.is_gzip(path)
  except FileNotFoundError:
    raise reader.IngestError(f"{what} file not found: {path}") from None
  except OSError as e:
    raise reader.unreadable(what, path, False, e) from None
  try:
    table, names, dropped = _read(path, gz, columns, optional or {})
  except reader.GZIP_ERRORS as e:
    raise reader.unreadable(what, path, gz, e) from None
  if table.num_rows == 0 and not any(dropped.values()):
    raise reader.IngestError(f"{what} file {path} is empty (no JSON lines).")
  result = reader.to_frame(table, names, keys)
  for reason, count in dropped.items():
    result.dropped[reason] = result.dropped.get(reason, 0) + count
  return result
