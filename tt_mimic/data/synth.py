"""Synthetic Amazon Reviews 2023 'Books' data, flattened to two CSV files.

`books.csv` holds the item metadata and `users.csv` the review events, in the
same columns and with the same kinds of dirt as a flattened real dump:

  books.csv: parent_asin,title,author,average_rating,rating_number,price,
             categories
  users.csv: parent_asin,userId,timestamp   (timestamp in epoch milliseconds)

The data carries a learnable signal on top of a heavy-tailed popularity:

* Books sit in a realistic three-level category tree
  (`["Books", top, sub]`) and are written by authors who mostly stay in one
  or two subcategories.
* Each user prefers one to three subcategories (often siblings) and a few
  favourite authors. Most events come from those preferences, the rest from
  global popularity, and the category mixture drifts towards a new
  subcategory over the user's sequence.
* Dirt: ~0.5% exact duplicate event rows, ~0.5% events for books missing
  from books.csv, ~3% empty category lists, ~15% empty and ~3% zero prices,
  a few missing ratings and empty or "Unknown" authors.

Everything is generated in chunks (books) and user blocks (events), so the
full Amazon size (4.4M books, 10M users, 29.5M events) runs in bounded
memory. A fixed seed gives byte-identical files, gzipped ones included.

Usage:
  tt-mimic synth --out_dir=data [--num_books=4000 --num_users=3000
      --num_events=80000 --seed=42 --gzip]
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import importlib.resources
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import TextIO

from absl import logging
import numpy as np
import pandas as pd

BOOK_COLUMNS = ("parent_asin", "title", "author", "average_rating",
                "rating_number", "price", "categories")
EVENT_COLUMNS = ("parent_asin", "userId", "timestamp")

# Dirt rates (shares of books or of events).
_EMPTY_CATEGORY_RATE = 0.03
_EMPTY_PRICE_RATE = 0.15
_ZERO_PRICE_RATE = 0.03
_EMPTY_RATING_RATE = 0.01
_EMPTY_AUTHOR_RATE = 0.02
_UNKNOWN_AUTHOR_RATE = 0.01
_DUPLICATE_RATE = 0.005
_UNKNOWN_BOOK_RATE = 0.005

# Shape of the catalog and of the users.
_BOOKS_PER_AUTHOR = 5
_PROLIFIC_AUTHOR_SHARE = 0.002
_PROLIFIC_AUTHOR_BOOST = 15.0
_SERIES_AUTHOR_SHARE = 0.3
_SERIES_BOOK_SHARE = 0.6
_ISBN_SHARE = 0.3
_EVENTS_PER_USER_SIGMA = 1.2
_AUTHOR_POP_SIGMA = 1.0
_BOOK_POP_SIGMA = 1.7
_MAX_EVENTS_PER_BOOK_SHARE = 0.25  # cap on a user's events, share of books

# Streams of the random generator, one per independent part of the output.
_STREAM_CATALOG = 1
_STREAM_BOOK_TEXT = 2
_STREAM_USER_COUNTS = 3
_STREAM_EVENTS = 4

_BOOK_CHUNK = 200_000
_EVENTS_PER_BLOCK = 500_000
_MAX_SAMPLING_ROUNDS = 6
_GZIP_LEVEL = 6

_ALNUM = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)
_B0_SPACE = 36**8  # codes below this are "B0" + 8 base-36 digits
_ISBN_SPACE = 200_000_000  # 9-digit ISBN bodies starting with 0 or 1


@dataclasses.dataclass(frozen=True)
class SynthConfig:
  """Size, seed and time range of a synthetic data set.

  Attributes:
    num_books: books written to books.csv.
    num_users: users with at least one event.
    num_events: approximate number of events before dirt (duplicates add
      ~0.5%; heavy users of a tiny catalog may come out a little short).
    seed: seed of every random choice; equal seeds give equal bytes.
    start_ms: earliest event time, epoch milliseconds (inclusive).
    end_ms: latest event time, epoch milliseconds (exclusive).
    dirt: add the dirt of real dumps (duplicate events, unknown books, empty
      categories/prices/ratings/authors, zero prices). False gives clean data.
  """
  num_books: int = 4000
  num_users: int = 3000
  num_events: int = 80000
  seed: int = 42
  start_ms: int = 1514764800000  # 2018-01-01
  end_ms: int = 1672531200000  # 2023-01-01
  dirt: bool = True


# ------------------------------------------------------------ category tree


@dataclasses.dataclass(frozen=True)
class _Top:
  """A top-level category with the words its titles are made of."""
  name: str
  weight: float
  price: float  # median list price
  fiction: bool
  subcategories: tuple[str, ...]
  nouns: tuple[str, ...]
  adjectives: tuple[str, ...]
  subtitles: tuple[str, ...] = ()


# The word lists and the category tree are data files of the package, in
# tt_mimic/data/words/ (read once, at import). Their order is part of the
# output: words are drawn by index, so editing a file changes the bytes.
_WORDS = importlib.resources.files("tt_mimic.data") / "words"


def _read_words(name: str) -> tuple[str, ...]:
  """A word list: one word or name per line; blank and '#' lines skipped."""
  text = (_WORDS / name).read_text(encoding="utf-8")
  lines = (line.strip() for line in text.split("\n"))
  words = tuple(line for line in lines if line and not line.startswith("#"))
  if not words:
    raise ValueError(f"word list {name} is empty")
  return words


def _read_tops(name: str) -> tuple[_Top, ...]:
  """The top-level categories, in order, from the JSON category tree."""
  tops = json.loads((_WORDS / name).read_text(encoding="utf-8"))["tops"]
  return tuple(
      _Top(**{key: tuple(value) if isinstance(value, list) else value
              for key, value in top.items()})
      for top in tops)


_TOPS = _read_tops("categories.json")

_TOP_INDEX = {top.name: t for t, top in enumerate(_TOPS)}

_COMMON_NOUNS = _read_words("common_nouns.txt")
_COMMON_ADJECTIVES = _read_words("common_adjectives.txt")
_COMMON_SUBTITLES = _read_words("common_subtitles.txt")
_PLACES = _read_words("places.txt")
_NUMBERS = ("7", "10", "12", "21", "50", "101")

# (template, weight). Fields: a=adjective, n and m=nouns, p=first name,
# place, s=subtitle, k=number.
_FICTION_TEMPLATES = (
    ("The {a} {n}", 5.0), ("{a} {n}", 2.0), ("The {n} of the {m}", 3.0),
    ("{p}'s {n}", 2.0), ("A {n} in {place}", 2.0), ("The Last {n}", 1.0),
    ("{n}, {m}, and Other Stories", 0.5), ('The "{a}" {n}', 0.4),
    ("Before the {n}", 1.0), ("{n} & {m}", 1.0),
    ("Where the {n} Ends", 1.0))
_NONFICTION_TEMPLATES = (
    ("The {a} {n}: {s}", 4.0), ("{n}: {s}", 3.0), ("The {n} Handbook", 1.5),
    ("{n} for Beginners", 1.5), ("The Art of {n}", 1.5),
    ("{k} Lessons on {n}", 1.0), ("Understanding {n}: {s}", 1.0),
    ("{a} {n}", 1.5), ("{n} and {m}: {s}", 1.0),
    ('"{n}," and Other Essays', 0.3))
# Series markers; the last one is for comics only.
_SERIES_FORMATS = ("{title} (Book {k})",
                   "{title} (The {word} Series, Book {k})",
                   "{title} ({word} Chronicles Book {k})",
                   "{title}, Vol. {k}")

_FIRST_NAMES = _read_words("first_names.txt")
_LAST_NAMES = _read_words("last_names.txt")
_INITIALS = tuple("ABCDEFGHJKLMNPRSTW")


@dataclasses.dataclass(frozen=True)
class _Tree:
  """The flattened category tree.

  Attributes:
    sub_top: top-level index of each subcategory.
    sub_weight: share of books and of demand of each subcategory (sums to 1).
    sub_json: JSON category path of each subcategory, as written to CSV.
  """
  sub_top: np.ndarray
  sub_weight: np.ndarray
  sub_json: np.ndarray


def _build_tree() -> _Tree:
  """Flattens `_TOPS`; within a top, earlier subcategories are bigger."""
  tops, weights, paths = [], [], []
  top_total = sum(top.weight for top in _TOPS)
  for t, top in enumerate(_TOPS):
    within = 0.75 ** np.arange(len(top.subcategories))
    within /= within.sum()
    for sub, share in zip(top.subcategories, within):
      tops.append(t)
      weights.append(top.weight / top_total * share)
      paths.append(json.dumps(["Books", top.name, sub], ensure_ascii=False))
  return _Tree(sub_top=np.array(tops, dtype=np.int16),
               sub_weight=np.array(weights) / np.sum(weights),
               sub_json=np.array(paths, dtype=object))


# --------------------------------------------------------- random helpers


def _rng(seed: int, *keys: int) -> np.random.Generator:
  """An independent generator for one (seed, stream, block) combination."""
  return np.random.default_rng([seed, *keys])


def _weighted_choice(rng: np.random.Generator, weights: np.ndarray,
                     size: int) -> np.ndarray:
  """Indices drawn with probability proportional to `weights`."""
  cdf = np.cumsum(weights, dtype=np.float64)
  pick = np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right")
  return np.minimum(pick, len(weights) - 1)


def _dirt_masks(rng: np.random.Generator, n: int, rates: Sequence[float],
                enabled: bool) -> list[np.ndarray]:
  """Disjoint boolean masks over n rows with about `rate * n` rows each.

  Each mask gets at least one row when enabled and n is large enough, so
  tiny data sets still show every kind of dirt.
  """
  masks = [np.zeros(n, dtype=bool) for _ in rates]
  if not enabled or n == 0:
    return masks
  order = rng.permutation(n)
  start = 0
  for mask, rate in zip(masks, rates):
    count = min(n - start, max(1, int(rate * n + rng.random())))
    mask[order[start:start + count]] = True
    start += count
  return masks


def _cumcount(groups: np.ndarray) -> np.ndarray:
  """Position of each row within its run of equal values in `groups`."""
  n = len(groups)
  if n == 0:
    return np.zeros(0, dtype=np.int64)
  is_start = np.r_[True, groups[1:] != groups[:-1]]
  start = np.maximum.accumulate(np.where(is_start, np.arange(n), 0))
  return np.arange(n) - start


@dataclasses.dataclass(frozen=True)
class _GroupedSampler:
  """Draws members of a group with probability proportional to a weight.

  Attributes:
    order: member ids sorted by group.
    cum: cumulative weight along `order`, with a leading 0.
    start: first position of each group in `order`.
    stop: one past the last position of each group in `order`.
  """
  order: np.ndarray
  cum: np.ndarray
  start: np.ndarray
  stop: np.ndarray

  @classmethod
  def build(cls, groups: np.ndarray, weights: np.ndarray,
            num_groups: int) -> _GroupedSampler:
    order = np.argsort(groups, kind="stable").astype(np.int64)
    cum = np.r_[0.0, np.cumsum(weights[order], dtype=np.float64)]
    counts = np.bincount(groups, minlength=num_groups)
    stop = np.cumsum(counts)
    return cls(order=order, cum=cum, start=stop - counts, stop=stop)

  def sizes(self) -> np.ndarray:
    return self.stop - self.start

  def sample(self, rng: np.random.Generator, groups: np.ndarray) -> np.ndarray:
    """One member per entry of `groups`; every group must be non-empty."""
    lo, hi = self.start[groups], self.stop[groups]
    target = self.cum[lo] + rng.random(len(groups)) * (
        self.cum[hi] - self.cum[lo])
    pos = np.searchsorted(self.cum, target, side="right") - 1
    return self.order[np.clip(pos, lo, hi - 1)]


# ------------------------------------------------------------- catalog


@dataclasses.dataclass(frozen=True)
class _Catalog:
  """Latent and numeric book attributes (no text), one row per book.

  Attributes:
    asin_codes: unique integer codes of the books, then of the "ghost" books
      that events may reference but books.csv does not list.
    sub: latent subcategory of each book (kept even if the CSV's is empty).
    author: author index of each book.
    pop: popularity weight of each book.
    series: number of the book within its author's series, 0 if none.
    author_names: display name of each author.
    author_top: top-level category of each author's main subcategory.
  """
  asin_codes: np.ndarray
  sub: np.ndarray
  author: np.ndarray
  pop: np.ndarray
  series: np.ndarray
  author_names: np.ndarray
  author_top: np.ndarray

  @property
  def num_books(self) -> int:
    return len(self.sub)


def _unique_asin_codes(rng: np.random.Generator, n: int) -> np.ndarray:
  """n distinct ASIN codes: ~70% Kindle-style "B0..." and ~30% ISBN-10."""
  codes = np.zeros(0, dtype=np.int64)
  while len(codes) < n:
    k = n - len(codes)
    isbn = rng.random(k) < _ISBN_SHARE
    fresh = np.where(isbn, _B0_SPACE + rng.integers(0, _ISBN_SPACE, k),
                     rng.integers(0, _B0_SPACE, k))
    codes = np.r_[codes, fresh]
    _, first = np.unique(codes, return_index=True)
    codes = codes[np.sort(first)]
  return codes


def format_asins(codes: np.ndarray) -> np.ndarray:
  """ASIN codes -> 10-character strings ("B0" + 8 base-36 or an ISBN-10)."""
  codes = np.asarray(codes, dtype=np.int64)
  out = np.empty((len(codes), 10), dtype=np.uint8)
  b0 = codes < _B0_SPACE
  value = codes[b0]
  out[b0, 0], out[b0, 1] = ord("B"), ord("0")
  for i in range(9, 1, -1):
    out[b0, i] = _ALNUM[value % 36]
    value //= 36
  value = codes[~b0] - _B0_SPACE
  digits = np.empty((len(value), 9), dtype=np.int64)
  for i in range(8, -1, -1):
    digits[:, i] = value % 10
    value //= 10
  check = (11 - (digits @ np.arange(10, 1, -1)) % 11) % 11
  out[~b0, :9] = ord("0") + digits
  out[~b0, 9] = np.frombuffer(b"0123456789X", np.uint8)[check]
  return out.view("S10").ravel().astype("U10")


def _author_names(rng: np.random.Generator, n: int) -> np.ndarray:
  """n author names such as "Mary Smith", "Mary K. Smith", "J. R. Smith"."""
  first = np.array(_FIRST_NAMES, dtype=object)[
      rng.integers(0, len(_FIRST_NAMES), n)]
  last = np.array(_LAST_NAMES, dtype=object)[
      rng.integers(0, len(_LAST_NAMES), n)]
  initial = np.array(_INITIALS, dtype=object)[
      rng.integers(0, len(_INITIALS), (n, 2))]
  style = rng.random(n)
  names = np.empty(n, dtype=object)
  for i in range(n):
    if style[i] < 0.75:
      names[i] = f"{first[i]} {last[i]}"
    elif style[i] < 0.9:
      names[i] = f"{first[i]} {initial[i, 0]}. {last[i]}"
    elif style[i] < 0.97:
      names[i] = f"{initial[i, 0]}. {initial[i, 1]}. {last[i]}"
    else:
      names[i] = f"{first[i]} {last[i]} Jr."
  return names


def _author_subcategories(rng: np.random.Generator, num_authors: int,
                          tree: _Tree) -> tuple[np.ndarray, np.ndarray]:
  """Main and second subcategory of each author (often a sibling)."""
  by_top = _GroupedSampler.build(tree.sub_top, tree.sub_weight, len(_TOPS))
  main = _weighted_choice(rng, tree.sub_weight, num_authors)
  sibling = by_top.sample(rng, tree.sub_top[main])
  anywhere = _weighted_choice(rng, tree.sub_weight, num_authors)
  kind = rng.random(num_authors)
  second = np.where(kind < 0.6, sibling, np.where(kind < 0.85, main, anywhere))
  return main, second


def _series_numbers(rng: np.random.Generator, author: np.ndarray,
                    fiction_book: np.ndarray) -> np.ndarray:
  """1, 2, 3, ... for the series books of each series author, else 0."""
  num_authors = int(author.max()) + 1
  series_author = rng.random(num_authors) < _SERIES_AUTHOR_SHARE
  in_series = (series_author[author] & fiction_book
               & (rng.random(len(author)) < _SERIES_BOOK_SHARE))
  order = np.argsort(author, kind="stable")
  numbers = np.zeros(len(author), dtype=np.int32)
  rows = order[in_series[order]]
  numbers[rows] = _cumcount(author[rows]) + 1
  return numbers


def _build_catalog(config: SynthConfig, tree: _Tree) -> _Catalog:
  """Authors, latent subcategories, popularity and ASINs of all books."""
  rng = _rng(config.seed, _STREAM_CATALOG)
  n = config.num_books
  num_authors = max(1, n // _BOOKS_PER_AUTHOR)
  productivity = rng.lognormal(0.0, 1.0, num_authors)
  prolific = rng.random(num_authors) < _PROLIFIC_AUTHOR_SHARE
  productivity[prolific] *= _PROLIFIC_AUTHOR_BOOST
  # Every author writes at least one book; the rest go by productivity.
  author = np.r_[np.arange(num_authors),
                 _weighted_choice(rng, productivity, n - num_authors)]
  author = rng.permutation(author).astype(np.int32)
  main, second = _author_subcategories(rng, num_authors, tree)
  breadth = rng.uniform(0.0, 0.4, num_authors)
  sub = np.where(rng.random(n) < breadth[author], second[author],
                 main[author]).astype(np.int16)
  author_pop = (rng.lognormal(0.0, _AUTHOR_POP_SIGMA, num_authors)
                * productivity**0.3)
  pop = author_pop[author] * rng.lognormal(0.0, _BOOK_POP_SIGMA, n)
  fiction = np.array([top.fiction for top in _TOPS])[tree.sub_top[sub]]
  num_ghosts = max(20, n // 50)
  return _Catalog(
      asin_codes=_unique_asin_codes(rng, n + num_ghosts),
      sub=sub, author=author, pop=pop,
      series=_series_numbers(rng, author, fiction),
      author_names=_author_names(rng, num_authors),
      author_top=tree.sub_top[main])


# ---------------------------------------------------------- books.csv


@dataclasses.dataclass(frozen=True)
class _WordPool:
  """One kind of title word for every top category, flattened.

  Top category t owns words[start[t]:start[t] + count[t]], its own genre
  words (the first genre[t] of them) before the shared ones.
  """
  words: np.ndarray
  start: np.ndarray
  count: np.ndarray
  genre: np.ndarray

  @classmethod
  def build(cls, genre: Sequence[Sequence[str]],
            shared: Sequence[Sequence[str]]) -> _WordPool:
    pools = [tuple(g) + tuple(s) for g, s in zip(genre, shared)]
    count = np.array([len(p) for p in pools])
    return cls(words=np.array([w for p in pools for w in p], dtype=object),
               start=np.cumsum(count) - count, count=count,
               genre=np.array([len(g) for g in genre]))

  def pick(self, rng: np.random.Generator, top: np.ndarray,
           avoid: np.ndarray | None = None) -> np.ndarray:
    """Flat word indices: 75% genre words, else any word of the row's top.

    Args:
      rng: random generator.
      top: top category of each row.
      avoid: flat indices that must not be repeated row by row.
    """
    n = len(top)
    size = np.where(rng.random(n) < 0.75, self.genre[top], self.count[top])
    offset = (rng.random(n) * size).astype(np.int64)
    if avoid is not None:
      same = self.start[top] + offset == avoid
      offset = np.where(same, (offset + 1) % self.count[top], offset)
    return self.start[top] + offset


@dataclasses.dataclass(frozen=True)
class _WordPools:
  """Nouns, adjectives and subtitles; shared nouns/adjectives: fiction only."""
  nouns: _WordPool
  adjectives: _WordPool
  subtitles: _WordPool


def _word_pools() -> _WordPools:
  def shared(words):
    return [words if top.fiction else () for top in _TOPS]
  return _WordPools(
      nouns=_WordPool.build([t.nouns for t in _TOPS], shared(_COMMON_NOUNS)),
      adjectives=_WordPool.build([t.adjectives for t in _TOPS],
                                 shared(_COMMON_ADJECTIVES)),
      subtitles=_WordPool.build([t.subtitles for t in _TOPS],
                                [_COMMON_SUBTITLES] * len(_TOPS)))


def _series_markers(author: np.ndarray, author_top: np.ndarray,
                    pools: _WordPools) -> tuple[np.ndarray, np.ndarray]:
  """Name word and marker style of each author's series (fixed per author).

  Comics series are numbered "Vol. k"; the others use the first formats.
  """
  author = author.astype(np.int64)
  nouns = pools.nouns
  word = nouns.words[nouns.start[author_top]
                     + (author * 7919) % nouns.genre[author_top]]
  comics = author_top == _TOP_INDEX["Comics & Graphic Novels"]
  style = np.where(comics, len(_SERIES_FORMATS) - 1,
                   author % (len(_SERIES_FORMATS) - 1))
  return word, style


def _titles(rng: np.random.Generator, top: np.ndarray, series: np.ndarray,
            author: np.ndarray, author_top: np.ndarray,
            pools: _WordPools) -> list[str]:
  """Genre-flavoured titles, with series markers on series books."""
  n = len(top)
  noun = pools.nouns.pick(rng, top)
  words = {
      "n": pools.nouns.words[noun],
      "m": pools.nouns.words[pools.nouns.pick(rng, top, avoid=noun)],
      "a": pools.adjectives.words[pools.adjectives.pick(rng, top)],
      "s": pools.subtitles.words[pools.subtitles.pick(rng, top)],
      "p": np.array(_FIRST_NAMES, dtype=object)[
          rng.integers(0, len(_FIRST_NAMES), n)],
      "place": np.array(_PLACES, dtype=object)[
          rng.integers(0, len(_PLACES), n)],
      "k": np.array(_NUMBERS, dtype=object)[rng.integers(0, len(_NUMBERS), n)],
  }
  fiction = np.array([t.fiction for t in _TOPS])[top]
  fiction_pick = _weighted_choice(
      rng, np.array([w for _, w in _FICTION_TEMPLATES]), n)
  nonfiction_pick = _weighted_choice(
      rng, np.array([w for _, w in _NONFICTION_TEMPLATES]), n)
  series_word, series_style = _series_markers(author, author_top, pools)
  titles = []
  for i in range(n):
    if fiction[i]:
      template = _FICTION_TEMPLATES[fiction_pick[i]][0]
    else:
      template = _NONFICTION_TEMPLATES[nonfiction_pick[i]][0]
    title = template.format(**{key: value[i] for key, value in words.items()})
    if series[i]:
      title = _SERIES_FORMATS[series_style[i]].format(
          title=title, word=series_word[i], k=series[i])
    titles.append(title)
  return titles


def _json_title(title: str) -> str:
  return "[" + json.dumps(title, ensure_ascii=False) + "]"


@dataclasses.dataclass(frozen=True)
class _BookNumbers:
  """Ratings, prices and the dirt masks of all books."""
  average_rating: np.ndarray  # float, NaN = empty
  rating_number: np.ndarray  # int64
  empty_rating: np.ndarray
  price: np.ndarray  # float, NaN = empty
  empty_category: np.ndarray
  empty_author: np.ndarray
  unknown_author: np.ndarray


def _prices(rng: np.random.Generator, top: np.ndarray) -> np.ndarray:
  """List prices around each top category's median, mostly ending in .99."""
  median = np.array([t.price for t in _TOPS])[top]
  base = median * rng.lognormal(0.0, 0.45, len(top))
  style = rng.random(len(top))
  price = np.where(style < 0.6, np.floor(base) + 0.99,
                   np.where(style < 0.75, np.floor(base) + 0.95,
                            np.where(style < 0.9, np.round(base),
                                     np.round(base, 2))))
  return np.round(np.maximum(price, 0.99), 2)


def _book_numbers(config: SynthConfig, catalog: _Catalog,
                  tree: _Tree) -> _BookNumbers:
  """Ratings follow popularity; prices follow the category; dirt is masked."""
  rng = _rng(config.seed, _STREAM_CATALOG, 1)
  n = catalog.num_books
  rel = catalog.pop / catalog.pop.mean()
  rating_number = np.maximum(
      1, np.rint(rel * 150.0 * rng.lognormal(0.0, 0.6, n))).astype(np.int64)
  quality = np.clip(rng.normal(4.35, 0.3, n), 2.5, 5.0)
  noise = rng.normal(0.0, 1.0, n) / np.sqrt(rating_number)
  average = np.round(np.clip(quality + noise, 1.0, 5.0), 1)
  price = _prices(rng, tree.sub_top[catalog.sub])
  empty_price, zero_price = _dirt_masks(
      rng, n, (_EMPTY_PRICE_RATE, _ZERO_PRICE_RATE), config.dirt)
  price[empty_price] = np.nan
  price[zero_price] = 0.0
  (empty_rating,) = _dirt_masks(rng, n, (_EMPTY_RATING_RATE,), config.dirt)
  average[empty_rating] = np.nan
  (empty_category,) = _dirt_masks(rng, n, (_EMPTY_CATEGORY_RATE,),
                                  config.dirt)
  empty_author, unknown_author = _dirt_masks(
      rng, n, (_EMPTY_AUTHOR_RATE, _UNKNOWN_AUTHOR_RATE), config.dirt)
  return _BookNumbers(average_rating=average, rating_number=rating_number,
                      empty_rating=empty_rating, price=price,
                      empty_category=empty_category, empty_author=empty_author,
                      unknown_author=unknown_author)


def _book_frame(lo: int, hi: int, config: SynthConfig, catalog: _Catalog,
                numbers: _BookNumbers, tree: _Tree,
                pools: _WordPools) -> pd.DataFrame:
  """Rows lo..hi-1 of books.csv."""
  rng = _rng(config.seed, _STREAM_BOOK_TEXT, lo // _BOOK_CHUNK)
  rows = slice(lo, hi)
  author = catalog.author[rows]
  titles = _titles(rng, tree.sub_top[catalog.sub[rows]], catalog.series[rows],
                   author, catalog.author_top[author], pools)
  author_name = catalog.author_names[author].copy()
  author_name[numbers.empty_author[rows]] = ""
  author_name[numbers.unknown_author[rows]] = "Unknown"
  categories = tree.sub_json[catalog.sub[rows]].copy()
  categories[numbers.empty_category[rows]] = "[]"
  rating_number = pd.arrays.IntegerArray(
      numbers.rating_number[rows], numbers.empty_rating[rows].copy())
  return pd.DataFrame({
      "parent_asin": format_asins(catalog.asin_codes[rows]),
      "title": [_json_title(t) for t in titles],
      "author": author_name,
      "average_rating": numbers.average_rating[rows],
      "rating_number": rating_number,
      "price": numbers.price[rows],
      "categories": categories,
  }, columns=list(BOOK_COLUMNS))


def _write_books(path: str, config: SynthConfig, catalog: _Catalog,
                 tree: _Tree) -> dict:
  """Writes books.csv chunk by chunk; returns the book-side counts."""
  numbers = _book_numbers(config, catalog, tree)
  pools = _word_pools()
  with _open_text(path) as handle:
    for lo in range(0, catalog.num_books, _BOOK_CHUNK):
      hi = min(lo + _BOOK_CHUNK, catalog.num_books)
      frame = _book_frame(lo, hi, config, catalog, numbers, tree, pools)
      _write_frame(frame, handle, header=lo == 0)
  return {
      "books": catalog.num_books,
      "authors": len(catalog.author_names),
      "series_books": int((catalog.series > 0).sum()),
      "empty_categories": int(numbers.empty_category.sum()),
      "empty_prices": int(np.isnan(numbers.price).sum()),
      "zero_prices": int((numbers.price == 0.0).sum()),
      "empty_ratings": int(numbers.empty_rating.sum()),
      "empty_authors": int(numbers.empty_author.sum()),
      "unknown_authors": int(numbers.unknown_author.sum()),
  }


# ---------------------------------------------------------- users.csv


@dataclasses.dataclass(frozen=True)
class _Samplers:
  """Popularity-weighted book samplers: per subcategory, per author, all."""
  by_sub: _GroupedSampler
  by_author: _GroupedSampler
  overall: _GroupedSampler
  sub_weight: np.ndarray  # demand weight of each subcategory with books
  sub_by_top: _GroupedSampler  # subcategories (with books) by top category


def _build_samplers(catalog: _Catalog, tree: _Tree) -> _Samplers:
  """Samplers over the catalog; subcategories without books get no demand."""
  num_subs = len(tree.sub_top)
  by_sub = _GroupedSampler.build(catalog.sub.astype(np.int64), catalog.pop,
                                 num_subs)
  sub_weight = tree.sub_weight * (by_sub.sizes() > 0)
  return _Samplers(
      by_sub=by_sub,
      by_author=_GroupedSampler.build(catalog.author.astype(np.int64),
                                      catalog.pop, len(catalog.author_names)),
      overall=_GroupedSampler.build(np.zeros(catalog.num_books, np.int64),
                                    catalog.pop, 1),
      sub_weight=sub_weight,
      sub_by_top=_GroupedSampler.build(tree.sub_top.astype(np.int64),
                                       sub_weight, len(_TOPS)))


@dataclasses.dataclass(frozen=True)
class _Tastes:
  """Latent preferences of a block of users.

  Attributes:
    subs: (users, 3) preferred subcategories (the 2nd and 3rd are often
      siblings of the 1st).
    sub_cdf: (users, 3) cumulative weights over `subs`; a user with fewer
      than 3 preferences has zero weight on the last columns.
    drift_sub: the subcategory each user drifts towards.
    drift: share of category events taken by `drift_sub` at the sequence end.
    authors: (users, 3) favourite authors.
    num_authors: how many of `authors` are used (1-3).
    p_category: share of events drawn from the preferred subcategories.
    p_author: share of events drawn from the favourite authors.
  """
  subs: np.ndarray
  sub_cdf: np.ndarray
  drift_sub: np.ndarray
  drift: np.ndarray
  authors: np.ndarray
  num_authors: np.ndarray
  p_category: np.ndarray
  p_author: np.ndarray


def _related_subs(rng: np.random.Generator, first: np.ndarray,
                  samplers: _Samplers, tree: _Tree,
                  sibling_share: float) -> np.ndarray:
  """Per user: a sibling of `first` or, otherwise, any subcategory."""
  sibling = samplers.sub_by_top.sample(rng, tree.sub_top[first])
  anywhere = _weighted_choice(rng, samplers.sub_weight, len(first))
  return np.where(rng.random(len(first)) < sibling_share, sibling, anywhere)


def _pick_pref_sub(rng: np.random.Generator, subs: np.ndarray,
                   cdf: np.ndarray) -> np.ndarray:
  """One subcategory per row from its preferred subcategories and weights."""
  column = (rng.random(len(subs))[:, None] > cdf).sum(axis=1)
  column = np.minimum(column, subs.shape[1] - 1)
  return subs[np.arange(len(subs)), column]


def _draw_tastes(rng: np.random.Generator, num_users: int,
                 samplers: _Samplers, catalog: _Catalog,
                 tree: _Tree) -> _Tastes:
  """Preferences of num_users users, drawn around the category demand."""
  num_subs = 1 + _weighted_choice(rng, np.array([0.35, 0.4, 0.25]), num_users)
  first = _weighted_choice(rng, samplers.sub_weight, num_users)
  subs = np.stack([first,
                   _related_subs(rng, first, samplers, tree, 0.5),
                   _related_subs(rng, first, samplers, tree, 0.5)], axis=1)
  weights = rng.gamma(1.0, size=(num_users, 3))
  weights[np.arange(3)[None, :] >= num_subs[:, None]] = 0.0
  sub_cdf = np.cumsum(weights, axis=1) / weights.sum(axis=1, keepdims=True)
  # Favourite authors write popular books in the preferred subcategories.
  fav_books = np.stack(
      [samplers.by_sub.sample(rng, _pick_pref_sub(rng, subs, sub_cdf))
       for _ in range(3)], axis=1)
  return _Tastes(
      subs=subs, sub_cdf=sub_cdf,
      drift_sub=_related_subs(rng, first, samplers, tree, 0.5),
      drift=rng.uniform(0.0, 0.7, num_users),
      authors=catalog.author[fav_books],
      num_authors=rng.integers(1, 4, num_users),
      p_category=rng.uniform(0.6, 0.85, num_users),
      p_author=rng.uniform(0.05, 0.2, num_users))


def _draw_candidates(rng: np.random.Generator, users: np.ndarray,
                     tastes: _Tastes,
                     samplers: _Samplers) -> tuple[np.ndarray, np.ndarray]:
  """Candidate books for a list of (repeated) users.

  Returns:
    (books, progress): book ids and each candidate's position in its user's
    sequence as a fraction in [0, 1); the category mixture drifts with it.
  """
  m = len(users)
  progress = rng.random(m)
  source = rng.random(m)
  from_category = source < tastes.p_category[users]
  from_author = ~from_category & (
      source < tastes.p_category[users] + tastes.p_author[users])
  books = samplers.overall.sample(rng, np.zeros(m, dtype=np.int64))
  sub = _pick_pref_sub(rng, tastes.subs[users], tastes.sub_cdf[users])
  drifting = rng.random(m) < tastes.drift[users] * progress
  sub = np.where(drifting, tastes.drift_sub[users], sub)
  books[from_category] = samplers.by_sub.sample(rng, sub[from_category])
  column = (rng.random(m) * tastes.num_authors[users]).astype(np.int64)
  author = tastes.authors[users, column]
  books[from_author] = samplers.by_author.sample(rng, author[from_author])
  return books, progress


def _first_unique(users: np.ndarray, books: np.ndarray, progress: np.ndarray,
                  quota: np.ndarray, num_books: int) -> tuple[np.ndarray, ...]:
  """Keeps, per user in row order, the first `quota` distinct books."""
  order = np.argsort(users, kind="stable")
  users, books, progress = users[order], books[order], progress[order]
  key = users.astype(np.int64) * num_books + books
  _, first = np.unique(key, return_index=True)
  keep = np.zeros(len(key), dtype=bool)
  keep[first] = True
  users, books, progress = users[keep], books[keep], progress[keep]
  keep = _cumcount(users) < quota[users]
  return users[keep], books[keep], progress[keep]


def _sample_events(rng: np.random.Generator, quota: np.ndarray,
                   tastes: _Tastes, samplers: _Samplers,
                   num_books: int) -> tuple[np.ndarray, np.ndarray]:
  """Distinct books per user, up to `quota`, in sequence order.

  Candidates are drawn in a few rounds for the users still short of their
  quota (repeats of a book are dropped), then sorted by sequence position.

  Returns:
    (users, books), grouped by user in sequence order.
  """
  users = np.zeros(0, dtype=np.int64)
  books = np.zeros(0, dtype=np.int64)
  progress = np.zeros(0)
  have = np.zeros(len(quota), dtype=np.int64)
  for attempt in range(_MAX_SAMPLING_ROUNDS):
    need = quota - have
    if not need.any():
      break
    extra = np.ceil(need * (1.15 + attempt)).astype(np.int64) + (need > 0)
    new_users = np.repeat(np.arange(len(quota)), extra)
    new_books, new_progress = _draw_candidates(rng, new_users, tastes,
                                               samplers)
    users, books, progress = _first_unique(
        np.r_[users, new_users], np.r_[books, new_books],
        np.r_[progress, new_progress], quota, num_books)
    have = np.bincount(users, minlength=len(quota))
  order = np.lexsort((progress, users))
  return users[order], books[order]


def _timestamps(rng: np.random.Generator, users: np.ndarray,
                counts: np.ndarray, config: SynthConfig) -> np.ndarray:
  """Sorted times per user inside an activity window that grows with use."""
  num_users = len(counts)
  span = config.end_ms - config.start_ms
  width = np.minimum(1.0, 0.05 + 0.95 * (1.0 - np.exp(-counts / 25.0))
                     * rng.uniform(0.6, 1.0, num_users))
  begin = rng.random(num_users) * (1.0 - width)
  offset = rng.random(len(users))
  offset = offset[np.lexsort((offset, users))]  # users is grouped
  frac = begin[users] + width[users] * offset
  ts = config.start_ms + np.floor(frac * span).astype(np.int64)
  return np.minimum(ts, config.end_ms - 1)


def _user_ids(rng: np.random.Generator, n: int) -> np.ndarray:
  """Amazon-style user ids: "A" + 27 upper-case letters and digits."""
  chars = np.empty((n, 28), dtype=np.uint8)
  chars[:, 0] = ord("A")
  chars[:, 1:] = _ALNUM[rng.integers(0, 36, (n, 27))]
  return chars.view("S28").ravel().astype("U28")


def _event_counts(config: SynthConfig) -> np.ndarray:
  """Heavy-tailed events per user, at least 1, summing to ~num_events."""
  rng = _rng(config.seed, _STREAM_USER_COUNTS)
  weights = rng.lognormal(0.0, _EVENTS_PER_USER_SIGMA, config.num_users)
  extra = rng.multinomial(config.num_events - config.num_users,
                          weights / weights.sum())
  cap = max(5, int(config.num_books * _MAX_EVENTS_PER_BOOK_SHARE))
  return np.minimum(1 + extra, cap)


def _block_bounds(counts: np.ndarray) -> np.ndarray:
  """User index boundaries of blocks with about _EVENTS_PER_BLOCK events."""
  total = np.cumsum(counts)
  cuts = np.searchsorted(total, np.arange(_EVENTS_PER_BLOCK, total[-1],
                                          _EVENTS_PER_BLOCK)) + 1
  return np.unique(np.r_[0, cuts, len(counts)])


def _event_block(block: int, lo: int, hi: int, counts: np.ndarray,
                 config: SynthConfig, catalog: _Catalog, samplers: _Samplers,
                 tree: _Tree) -> tuple[pd.DataFrame, dict]:
  """Events of users lo..hi-1, with dirt; returns the rows and dirt counts."""
  rng = _rng(config.seed, _STREAM_EVENTS, block)
  quota = counts[lo:hi]
  tastes = _draw_tastes(rng, hi - lo, samplers, catalog, tree)
  users, books = _sample_events(rng, quota, tastes, samplers,
                                catalog.num_books)
  ts = _timestamps(rng, users, np.bincount(users, minlength=hi - lo), config)
  ghost, duplicate = _dirt_masks(
      rng, len(users), (_UNKNOWN_BOOK_RATE, _DUPLICATE_RATE), config.dirt)
  num_ghosts = len(catalog.asin_codes) - catalog.num_books
  books[ghost] = catalog.num_books + rng.integers(0, num_ghosts,
                                                  int(ghost.sum()))
  rows = np.repeat(np.arange(len(users)), 1 + duplicate)
  frame = pd.DataFrame({
      "parent_asin": format_asins(catalog.asin_codes[books[rows]]),
      "userId": _user_ids(rng, hi - lo)[users[rows]],
      "timestamp": ts[rows],
  }, columns=list(EVENT_COLUMNS))
  return frame, {"events": len(rows), "duplicates": int(duplicate.sum()),
                 "unknown_book_events": int(ghost.sum())}


def _write_events(path: str, config: SynthConfig, catalog: _Catalog,
                  tree: _Tree) -> dict:
  """Writes users.csv block by block; returns the event-side counts."""
  samplers = _build_samplers(catalog, tree)
  counts = _event_counts(config)
  bounds = _block_bounds(counts)
  totals = {"users": config.num_users, "events": 0, "duplicates": 0,
            "unknown_book_events": 0}
  with _open_text(path) as handle:
    for block, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
      frame, block_counts = _event_block(block, lo, hi, counts, config,
                                         catalog, samplers, tree)
      _write_frame(frame, handle, header=block == 0)
      for key, value in block_counts.items():
        totals[key] += value
      logging.log_every_n(logging.INFO, "users.csv: %d of %d users written",
                          10, hi, config.num_users)
  return totals


# ------------------------------------------------------------- output


@contextlib.contextmanager
def _open_text(path: str) -> Iterator[TextIO]:
  """A UTF-8 text handle; gzip (with reproducible bytes) if path ends .gz."""
  with open(path, "wb") as raw:
    if path.endswith(".gz"):
      with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                         compresslevel=_GZIP_LEVEL) as packed:
        with io.TextIOWrapper(packed, encoding="utf-8", newline="") as text:
          yield text
    else:
      with io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
        yield text


def _write_frame(frame: pd.DataFrame, handle: TextIO, header: bool) -> None:
  frame.to_csv(handle, index=False, header=header, lineterminator="\n")


def _check(config: SynthConfig) -> None:
  if config.num_books < 10:
    raise ValueError(f"num_books must be at least 10, got {config.num_books}")
  if config.num_users < 1:
    raise ValueError(f"num_users must be positive, got {config.num_users}")
  if config.num_events < config.num_users:
    raise ValueError(f"num_events ({config.num_events}) must be at least "
                     f"num_users ({config.num_users}): every user has events")
  if config.end_ms <= config.start_ms:
    raise ValueError(f"end_ms ({config.end_ms}) must be after start_ms "
                     f"({config.start_ms})")
  if config.seed < 0:
    raise ValueError(f"seed must be non-negative, got {config.seed}")


def generate(out_dir: str, config: SynthConfig, books_name: str = "books.csv",
             users_name: str = "users.csv") -> dict:
  """Writes books and events files for `config` into `out_dir`.

  A name ending in ".gz" is gzip-compressed (with a fixed header, so the
  bytes are reproducible too).

  Args:
    out_dir: output directory, created if missing.
    config: sizes, seed, time range and whether to add dirt.
    books_name: file name of the book metadata.
    users_name: file name of the events.

  Returns:
    Counts: books, authors, series_books, empty_categories, empty_prices,
    zero_prices, empty_ratings, empty_authors, unknown_authors, users,
    events (rows written, duplicates included), duplicates,
    unknown_book_events.
  """
  _check(config)
  os.makedirs(out_dir, exist_ok=True)
  tree = _build_tree()
  catalog = _build_catalog(config, tree)
  counts = _write_books(os.path.join(out_dir, books_name), config, catalog,
                        tree)
  logging.info("Wrote %d books to %s", counts["books"],
               os.path.join(out_dir, books_name))
  counts.update(_write_events(os.path.join(out_dir, users_name), config,
                              catalog, tree))
  logging.info("Wrote %d events to %s", counts["events"],
               os.path.join(out_dir, users_name))
  return counts
