"""Lenient parsers for the Amazon Books CSV fields.

Real dumps hold JSON lists (`["Books", "Literature & Fiction"]`), Python
list reprs (`['a', 'b']`), plain strings, empty cells, `None`/`null` and
broken quoting. Each parser maps a pandas Series of raw strings to clean
values and never raises on a bad cell.

A list cell is malformed when it starts with "[" or "{" but is neither a
JSON value nor a Python literal, or when it holds a JSON object: it is
kept as well as it can be read (a broken list split on its quote-comma-
quote seams, other text as one element, an object as []) and counted, so
ingest can report it as repaired.
"""

from __future__ import annotations

import ast
import json

import numpy as np
import pandas as pd

_NULLS = frozenset({"", "none", "null", "nan", "na", "n/a", "[]", "unknown",
                    "unknown author", "[unknown]"})


def _as_list(raw: str, malformed: list) -> list[str]:
  """One cell -> list of non-empty strings; appends it to `malformed` if so.

  (A list to append to rather than a returned flag: a tuple per cell made
  parsing measurably slower on large files.)
  """
  text = raw.strip()
  if text.lower() in _NULLS:
    return []
  value = None
  if text[:1] in "[\"{":
    try:
      value = json.loads(text)
    except (ValueError, RecursionError):
      try:
        value = ast.literal_eval(text) if text[:1] == "[" else None
      except (ValueError, TypeError, SyntaxError, MemoryError,
              RecursionError):
        value = None
      if value is None and text[:1] != "\"":
        malformed.append(raw)
      if value is None and text[:1] == "[" and text[-1:] == "]":
        # Broken JSON list: split the inside on the quote-comma-quote seams.
        inner = text[1:-1].strip().strip("\"'")
        value = [p.strip().strip("\"'") for p in inner.split("\",")]
  if value is None:
    value = [text]
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, list):
    if isinstance(value, dict):  # a JSON object, not a list
      malformed.append(raw)
    value = [value] if isinstance(value, (int, float)) else []
  out = []
  for v in value:
    if isinstance(v, list):  # nested lists: flatten one level
      out.extend(str(x).strip() for x in v)
    elif v is not None:
      out.append(str(v).strip())
  return [v for v in out if v and v.lower() not in _NULLS]


def parse_json_list(raw: pd.Series) -> tuple[list[list[str]], int]:
  """Parses a column of list-like cells; bad cells become [] or [text].

  Returns:
    (lists, malformed): one list of strings per cell, and how many cells
    were malformed (see the module docstring).
  """
  malformed = []
  lists = [_as_list(str(x), malformed) for x in raw.to_numpy()]
  return lists, len(malformed)


def parse_title(raw: pd.Series) -> tuple[np.ndarray, int]:
  """Title cells (JSON lists of strings) -> one string each ('' if none).

  Returns:
    (titles, malformed): an object array of strings, and how many cells
    were malformed lists.
  """
  malformed = []
  titles = [" ".join(_as_list(str(x), malformed)) for x in raw.to_numpy()]
  return np.array(titles, dtype=object), len(malformed)


def _author(raw: str) -> str:
  text = raw.strip()
  if text[:1] == "{":
    try:
      text = str(json.loads(text).get("name", ""))
    except (ValueError, AttributeError):
      pass
  text = " ".join(text.split())
  return "" if text.lower() in _NULLS else text


def clean_author(raw: pd.Series) -> np.ndarray:
  """Author cells -> trimmed names; unknown/empty -> ''."""
  return np.array([_author(str(x)) for x in raw.to_numpy()], dtype=object)


def parse_nonnegative(raw: pd.Series) -> tuple[np.ndarray, dict]:
  """Numeric cells -> float64 with NaN for missing; counts invalid values.

  Returns:
    (values, counts) where counts maps 'missing', 'non_numeric', 'negative'
    and 'non_finite' to how many cells were set missing for that reason.
  """
  text = raw.astype(str).str.strip().str.replace(r"^\$", "", regex=True)
  missing = text.str.lower().isin(_NULLS).to_numpy()
  values = pd.to_numeric(text.where(~missing, None), errors="coerce")
  values = values.to_numpy(dtype=np.float64, na_value=np.nan)
  non_numeric = ~missing & np.isnan(values)
  non_finite = np.isinf(values)
  negative = (values < 0) & ~non_finite
  values = np.where(non_finite | negative, np.nan, values)
  return values, {"missing": int(missing.sum()),
                  "non_numeric": int(non_numeric.sum()),
                  "negative": int(negative.sum()),
                  "non_finite": int(non_finite.sum())}
