"""Reads the required columns of an input CSV, counting every bad row.

`read_csv` returns the required columns as text plus, by reason, the rows
it dropped and the rows it kept after repairing a cell:

  malformed_row     (dropped) a record whose number of fields differs from
                    the header's; each physical line of it counts as a row,
                    so a runaway quote that swallows lines is counted whole.
  field_too_large   (dropped) a required field over FIELD_LIMIT bytes.
  invalid_utf8      (dropped) undecodable bytes in a key column (an id or
                    a timestamp: a repaired id would name another record);
                    (repaired) in any other column, which is decoded with
                    U+FFFD for the bad bytes.

So `rows read = len(frame) + sum(dropped)` always holds (blank lines are
not rows). The file is gzip when it starts with the gzip magic bytes,
whatever its name. A header with a repeated column name (after stripping
spaces; empty names may repeat), a missing required column, an empty file
and a truncated or corrupt gzip stream are an `IngestError` naming the
file, in one line.

The fast path is pyarrow's multi-threaded CSV reader, as before: it holds
the required columns of the whole file, nothing else. A file it cannot
parse (a row longer than its 8 MiB block, e.g. after an unterminated
quote) is read again by Python's csv module, streaming, into Arrow chunks
of 256K rows, with the same counts; a field there may be up to 64 MiB
(beyond, its row is field_too_large), which bounds the memory of a
runaway quote.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import io
import sys
import zlib

from absl import logging
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

FIELD_LIMIT = 131_072  # bytes; Python csv's default field_size_limit
_BLOCK_SIZE = 8 << 20  # pyarrow's block: rows longer than this fall back
_PARSE_LIMIT = 64 << 20  # the Python reader's field limit (bounds memory)
_CHUNK_ROWS = 1 << 18  # rows per Arrow chunk on the Python path
GZIP_ERRORS = (EOFError, OSError, zlib.error)


class IngestError(ValueError):
  """Input that cannot be turned into a training set, with the reason."""


def unreadable(what: str, path: str, gz: bool, error: Exception):
  """The IngestError for an OSError/EOFError while reading the file."""
  if gz:
    return IngestError(f"Cannot read {what} file {path}: its gzip stream is "
                       f"truncated or corrupt ({error}).")
  return IngestError(f"Cannot read {what} file {path}: {error}")


@dataclasses.dataclass
class ReadResult:
  """The required columns of a CSV and what reading them dropped/repaired.

  Attributes:
    frame: one str column per required column, in the order asked for.
    dropped: rows dropped, by reason; read = len(frame) + sum(dropped).
    repaired: rows kept with a repaired cell, by reason.
  """
  frame: pd.DataFrame
  dropped: dict
  repaired: dict


def is_gzip(path: str) -> bool:
  """Whether the file starts with the gzip magic bytes."""
  with open(path, "rb") as f:
    return f.read(2) == b"\x1f\x8b"


def open_binary(path: str, gz: bool):
  """The file's bytes, decompressed when `gz`."""
  return gzip.open(path, "rb") if gz else open(path, "rb")


def _header(path: str, gz: bool, what: str) -> list[str]:
  """The stripped column names of the first CSV record."""
  try:
    with open_binary(path, gz) as raw:
      text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace",
                              newline="")
      row = next(csv.reader(text), None)
  except GZIP_ERRORS as e:
    raise unreadable(what, path, gz, e) from None
  except csv.Error as e:
    raise IngestError(f"Cannot read the header of {what} file {path}: "
                      f"{e}") from None
  if row is None:
    raise IngestError(f"{what} file {path} is empty (no header row).")
  return [c.strip() for c in row]


def _check_header(names: list[str], required, path: str, what: str) -> None:
  seen, repeated = set(), []
  for name in names:
    if name and name in seen and name not in repeated:
      repeated.append(name)
    seen.add(name)
  if repeated:
    raise IngestError(f"{what} file {path} repeats column(s) {repeated} in "
                      f"its header; each column name must appear once.")
  missing = [c for c in required if c not in seen]
  if missing:
    raise IngestError(
        f"{what} file {path} is missing required column(s) {missing}; "
        f"columns found: {names}")


def _lines(text: str | None) -> int:
  """Physical lines of a record's text (\\n, \\r\\n or \\r endings)."""
  if not text:
    return 1
  return 1 + text.count("\n") + text.count("\r") - text.count("\r\n")


@contextlib.contextmanager
def _quiet_row_decoding():
  """Hides pyarrow's 'Exception ignored' print for an undecodable bad row.

  pyarrow decodes a malformed row's text before calling the handler; when
  that fails it prints a traceback and raises ArrowInvalid, which sends
  the file to the Python reader, which counts the row.
  """
  hook = sys.unraisablehook

  def quiet(unraisable):
    if not isinstance(unraisable.exc_value, UnicodeDecodeError):
      hook(unraisable)

  sys.unraisablehook = quiet
  try:
    yield
  finally:
    sys.unraisablehook = hook


def _read_fast(path: str, gz: bool, width: int,
               positions: list[int]) -> tuple[pa.Table, int]:
  """pyarrow: binary columns at `positions` and the malformed line count."""
  names = [f"c{i}" for i in range(width)]
  malformed = [0]

  def skip(row):
    malformed[0] += _lines(row.text)
    return "skip"

  with _quiet_row_decoding():
    table = pa_csv.read_csv(
        pa.input_stream(path, compression="gzip" if gz else None),
        read_options=pa_csv.ReadOptions(column_names=names, skip_rows=1,
                                        block_size=_BLOCK_SIZE),
        parse_options=pa_csv.ParseOptions(newlines_in_values=True,
                                          invalid_row_handler=skip),
        convert_options=pa_csv.ConvertOptions(
            include_columns=[names[p] for p in positions],
            column_types={names[p]: pa.binary() for p in positions},
            strings_can_be_null=False, quoted_strings_can_be_null=False))
  return table, malformed[0]


@contextlib.contextmanager
def _field_limit(limit: int):
  old = csv.field_size_limit(limit)
  try:
    yield
  finally:
    csv.field_size_limit(old)


def _read_slow(path: str, gz: bool, width: int,
               positions: list[int]) -> tuple[pa.Table, dict]:
  """Python csv, streaming: the same columns and the dropped line counts."""
  columns = [[] for _ in positions]
  chunks = [[] for _ in positions]
  dropped = {"malformed_row": 0, "field_too_large": 0}
  with open_binary(path, gz) as raw, _field_limit(_PARSE_LIMIT):
    text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape",
                            newline="")
    reader = csv.reader(text)
    next(reader, None)  # the header
    line = reader.line_num
    while True:
      try:
        row = next(reader)
      except StopIteration:
        break
      except csv.Error as e:  # the reader resyncs at the next line
        reason = ("field_too_large" if "field limit" in str(e)
                  else "malformed_row")
        dropped[reason] += max(reader.line_num - line, 1)
        line = reader.line_num
        continue
      spanned, line = reader.line_num - line, reader.line_num
      if not row:
        continue  # blank line, as pyarrow skips them
      if len(row) != width:
        dropped["malformed_row"] += spanned
        continue
      for column, p in zip(columns, positions):
        column.append(row[p].encode("utf-8", "surrogateescape"))
      if len(columns[0]) >= _CHUNK_ROWS:
        for chunk, column in zip(chunks, columns):
          chunk.append(pa.array(column, pa.binary()))
          column.clear()
  for chunk, column in zip(chunks, columns):
    chunk.append(pa.array(column, pa.binary()))
  table = pa.table({f"c{p}": pa.chunked_array(chunk)
                    for p, chunk in zip(positions, chunks)})
  return table, dropped


def _bad_utf8(column: pa.ChunkedArray) -> np.ndarray | None:
  """Mask of undecodable values, or None when all decode."""
  masks, any_bad = [], False
  for chunk in column.chunks:
    try:
      chunk.cast(pa.string())
      masks.append(np.zeros(len(chunk), dtype=bool))
    except pa.ArrowInvalid:
      masks.append(np.array([not _decodes(v) for v in chunk.to_pylist()]))
      any_bad = True
  return np.concatenate(masks) if any_bad else None


def _decodes(value: bytes) -> bool:
  try:
    value.decode("utf-8")
    return True
  except UnicodeDecodeError:
    return False


def to_frame(table: pa.Table, names: list[str], keys) -> ReadResult:
  """Binary columns -> str frame, dropping/repairing by FIELD_LIMIT, UTF-8.

  Shared with the JSONL reader (`jsonl`), so both count alike.
  """
  n = table.num_rows
  too_large = np.zeros(n, dtype=bool)
  for column in table.columns:
    lengths = pc.binary_length(column)
    if n and pc.max(lengths).as_py() > FIELD_LIMIT:
      too_large |= lengths.to_numpy() > FIELD_LIMIT
  invalid, repaired = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
  fixed = {}
  for name, column in zip(names, table.columns):
    bad = _bad_utf8(column)
    if bad is None:
      continue
    if name in keys:
      invalid |= bad & ~too_large
    else:
      repaired |= bad
      fixed[name] = pa.array([v.decode("utf-8", "replace")
                              for v in column.to_pylist()], pa.string())
  keep = ~(too_large | invalid)
  columns = {}
  for name, column in zip(names, table.columns):
    column = fixed.get(name, column)
    if not keep.all():
      column = column.filter(pa.array(keep))
    columns[name] = column.cast(pa.string())
  frame = pa.table(columns).to_pandas()
  return ReadResult(frame=frame,
               dropped={"field_too_large": int(too_large.sum()),
                        "invalid_utf8": int(invalid.sum())},
               repaired={"invalid_utf8": int((repaired & keep).sum())})


def read_csv(path: str, required: tuple[str, ...], what: str,
             keys: tuple[str, ...] = (),
             optional: tuple[str, ...] = ()) -> ReadResult:
  """Reads the required columns of a CSV (any order, extras ignored) as text.

  Args:
    path: the CSV, plain or gzip.
    required: column names that must be in the header.
    what: "books" or "users", for the messages.
    keys: required columns in which undecodable bytes drop the row (in the
      others they are replaced by U+FFFD and the row counted as repaired).
    optional: columns read too when the header has them (after the
      required ones in the frame; never keys).

  Returns:
    A `ReadResult` (see the module docstring for the reasons).

  Raises:
    IngestError: no such file, no header, a repeated or missing column,
      a truncated or corrupt gzip stream.
  """
  try:
    gz = is_gzip(path)
  except FileNotFoundError:
    raise IngestError(f"{what} file not found: {path}") from None
  except OSError as e:
    raise unreadable(what, path, False, e) from None
  names = _header(path, gz, what)
  _check_header(names, required, path, what)
  columns = list(required) + [c for c in optional if c in names]
  positions = [names.index(c) for c in columns]
  try:
    table, malformed = _read_fast(path, gz, len(names), positions)
    dropped = {"malformed_row": malformed}
  except pa.ArrowInvalid as e:
    logging.warning("pyarrow could not parse %s (%s); reading it with "
                    "Python's csv module (bad rows are counted).", path, e)
    try:
      table, dropped = _read_slow(path, gz, len(names), positions)
    except GZIP_ERRORS as e2:
      raise unreadable(what, path, gz, e2) from None
  except OSError as e:  # pyarrow's gzip errors (truncated, corrupt)
    raise unreadable(what, path, gz, e) from None
  table = table.rename_columns(columns)
  result = to_frame(table, columns, keys)
  for reason, count in dropped.items():
    result.dropped[reason] = result.dropped.get(reason, 0) + count
  return result
