"""Tests for the synthetic Amazon Books generator (tt_mimic.data.synth)."""

import configparser
import fnmatch
import gzip
import importlib.resources
import json
import os
import re
import subprocess
import sys

from absl import flags
import numpy as np
import pandas as pd
import pytest

import tiny_data
from tt_mimic.data import synth

TINY = synth.SynthConfig(num_books=200, num_users=100, num_events=2000, seed=7)
TOP_NAMES = {top.name for top in synth._TOPS}
# The data files the generator reads, in tt_mimic/data/words/.
WORD_LISTS = ("common_nouns.txt", "common_adjectives.txt",
              "common_subtitles.txt", "places.txt", "first_names.txt",
              "last_names.txt")
CATEGORY_TREE = "categories.json"
SETUP_CFG = os.path.join(tiny_data.REPO, "setup.cfg")


def _read(directory, books_name="books.csv", users_name="users.csv"):
  """Both files as text columns, empty cells kept as ''."""
  books = pd.read_csv(os.path.join(directory, books_name), dtype=str,
                      keep_default_na=False)
  events = pd.read_csv(os.path.join(directory, users_name), dtype=str,
                       keep_default_na=False)
  return books, events


def _file_bytes(directory, *names):
  out = []
  for name in names:
    with open(os.path.join(directory, name), "rb") as f:
      out.append(f.read())
  return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tiny"))
  counts = synth.generate(directory, TINY)
  books, events = _read(directory)
  return directory, counts, books, events


def test_headers_are_exact(tiny):
  directory, _, _, _ = tiny
  with open(os.path.join(directory, "books.csv"), encoding="utf-8") as f:
    assert f.readline() == ("parent_asin,title,author,average_rating,"
                            "rating_number,price,categories\n")
  with open(os.path.join(directory, "users.csv"), encoding="utf-8") as f:
    assert f.readline() == "parent_asin,userId,timestamp\n"


def test_row_counts_match_returned_counts(tiny):
  _, counts, books, events = tiny
  assert len(books) == counts["books"] == TINY.num_books
  assert len(events) == counts["events"]
  assert events["userId"].nunique() == counts["users"] == TINY.num_users
  # A tiny, dense catalog cannot give heavy users enough distinct books.
  assert 0.6 * TINY.num_events <= counts["events"] <= 1.05 * TINY.num_events


def test_asins_are_unique_and_well_formed(tiny):
  _, _, books, _ = tiny
  asins = books["parent_asin"]
  assert asins.is_unique
  assert asins.str.fullmatch(r"B0[0-9A-Z]{8}|[0-9]{9}[0-9X]").all()
  isbns = asins[~asins.str.startswith("B0")]
  assert len(isbns) > 0
  for isbn in isbns:  # ISBN-10 check digit: weighted sum divisible by 11
    digits = [10 if c == "X" else int(c) for c in isbn]
    assert sum((10 - i) * d for i, d in enumerate(digits)) % 11 == 0, isbn


def _word_files():
  """The files of tt_mimic/data/words/, found as package resources."""
  words = importlib.resources.files("tt_mimic.data") / "words"
  assert words.is_dir()
  return {entry.name: entry for entry in words.iterdir() if entry.is_file()}


def test_word_files_are_package_resources():
  files = _word_files()
  assert set(files) == {*WORD_LISTS, CATEGORY_TREE}
  for name in WORD_LISTS:
    words = synth._read_words(name)
    assert words and all(w and w == w.strip() for w in words), name
  tree = json.loads(files[CATEGORY_TREE].read_text(encoding="utf-8"))
  assert len(tree["tops"]) == len(synth._TOPS) > 0
  for top in synth._TOPS:
    assert top.subcategories and top.nouns and top.adjectives, top.name
  assert synth._FIRST_NAMES == synth._read_words("first_names.txt")


def test_setup_cfg_ships_every_word_file():
  # A non-editable install (pip install ., a wheel) only gets the files
  # that [options.package_data] names.
  setup = configparser.ConfigParser()
  setup.read(SETUP_CFG, encoding="utf-8")
  patterns = setup["options.package_data"]["tt_mimic.data"].replace(
      ",", " ").split()
  for name in _word_files():
    assert any(fnmatch.fnmatch(f"words/{name}", p) for p in patterns), name


def test_format_asins_known_isbn():
  code = synth._B0_SPACE + 30640615  # ISBN 0-306-40615-2
  assert synth.format_asins(np.array([code, 0]))[0] == "0306406152"
  assert synth.format_asins(np.array([0]))[0] == "B000000000"


def test_user_ids_look_like_amazon(tiny):
  _, _, _, events = tiny
  assert events["userId"].str.fullmatch(r"A[0-9A-Z]{27}").all()


def test_json_fields_parse(tiny):
  _, _, books, _ = tiny
  for cell in books["title"]:
    title = json.loads(cell)
    assert isinstance(title, list) and len(title) == 1
    assert isinstance(title[0], str) and title[0]
  for cell in books["categories"]:
    path = json.loads(cell)
    assert isinstance(path, list)
    if path:
      assert len(path) == 3 and path[0] == "Books" and path[1] in TOP_NAMES
      assert all(isinstance(p, str) and p for p in path)


def test_titles_have_awkward_characters(tmp_path):
  synth.generate(str(tmp_path), synth.SynthConfig(
      num_books=2000, num_users=10, num_events=100, seed=1))
  books, _ = _read(str(tmp_path))
  titles = [json.loads(t)[0] for t in books["title"]]
  assert any("," in t for t in titles)
  assert any('"' in t for t in titles)
  assert any("'" in t for t in titles)
  assert any(not t.isascii() for t in titles)
  assert any(re.search(r"\(.*Book \d+\)|Vol\. \d+", t) for t in titles)


def test_numeric_fields(tiny):
  _, _, books, _ = tiny
  rating = books["average_rating"]
  filled = rating[rating != ""]
  assert filled.str.fullmatch(r"[1-5]\.[0-9]").all()
  assert filled.astype(float).between(1.0, 5.0).all()
  count = books["rating_number"]
  assert count[count != ""].str.fullmatch(r"[1-9][0-9]*").all()
  price = books["price"]
  assert price[price != ""].str.fullmatch(r"[0-9]+\.[0-9]{1,2}").all()


def test_timestamps_in_range_and_sorted_per_user(tiny):
  _, _, _, events = tiny
  ts = events["timestamp"].astype(np.int64)
  assert ts.min() >= TINY.start_ms and ts.max() < TINY.end_ms
  by_user = events.assign(ts=ts).groupby("userId", sort=False)["ts"]
  assert by_user.apply(lambda t: t.is_monotonic_increasing).all()
  # Events are spread over the years, not bunched up.
  assert ts.max() - ts.min() > 0.5 * (TINY.end_ms - TINY.start_ms)


def test_dirt_is_present(tiny):
  _, counts, books, events = tiny
  assert counts["duplicates"] > 0
  assert events.duplicated().sum() >= counts["duplicates"]
  unknown = ~events["parent_asin"].isin(books["parent_asin"])
  assert counts["unknown_book_events"] > 0
  assert unknown.sum() >= counts["unknown_book_events"]
  assert (books["categories"] == "[]").sum() == counts["empty_categories"] > 0
  assert (books["price"] == "").sum() == counts["empty_prices"] > 0
  assert (books["price"] == "0.0").sum() == counts["zero_prices"] > 0
  assert (books["average_rating"] == "").sum() == counts["empty_ratings"] > 0
  assert (books["author"] == "").sum() == counts["empty_authors"] > 0
  assert (books["author"] == "Unknown").sum() == counts["unknown_authors"] > 0


def test_clean_data_has_no_dirt(tmp_path):
  counts = synth.generate(str(tmp_path),
                          synth.SynthConfig(**{**vars(TINY), "dirt": False}))
  books, events = _read(str(tmp_path))
  assert counts["duplicates"] == counts["unknown_book_events"] == 0
  assert not events.duplicated(["userId", "parent_asin"]).any()
  assert events["parent_asin"].isin(books["parent_asin"]).all()
  assert (books["categories"] != "[]").all()
  for column in ("price", "average_rating", "rating_number", "author"):
    assert (books[column] != "").all(), column
  assert (books["price"].astype(float) > 0).all()


def test_same_seed_gives_same_bytes(tmp_path):
  names = ("books.csv", "users.csv")
  synth.generate(str(tmp_path / "a"), TINY)
  synth.generate(str(tmp_path / "b"), TINY)
  assert _file_bytes(tmp_path / "a", *names) == _file_bytes(tmp_path / "b",
                                                            *names)


def test_gzip_is_reproducible_and_matches_plain(tmp_path, tiny):
  directory, _, _, _ = tiny
  names = ("books.csv.gz", "users.csv.gz")
  for sub in ("a", "b"):
    synth.generate(str(tmp_path / sub), TINY, *names)
  packed = _file_bytes(tmp_path / "a", *names)
  assert packed == _file_bytes(tmp_path / "b", *names)
  plain = _file_bytes(directory, "books.csv", "users.csv")
  assert [gzip.decompress(p) for p in packed] == plain


def test_different_seed_gives_different_data(tmp_path, tiny):
  directory, _, _, _ = tiny
  other = synth.SynthConfig(**{**vars(TINY), "seed": TINY.seed + 1})
  synth.generate(str(tmp_path), other)
  for name in ("books.csv", "users.csv"):
    assert _file_bytes(tmp_path, name) != _file_bytes(directory, name)


def test_invalid_config_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="num_events"):
    synth.generate(str(tmp_path), synth.SynthConfig(num_users=10,
                                                    num_events=5))
  with pytest.raises(ValueError, match="end_ms"):
    synth.generate(str(tmp_path), synth.SynthConfig(start_ms=5, end_ms=5))


def _clean_events(books, events):
  """Drops duplicate and unknown-book events; sorts each user by time."""
  events = events.drop_duplicates(["userId", "parent_asin"])
  events = events[events["parent_asin"].isin(books["parent_asin"])]
  events = events.assign(timestamp=events["timestamp"].astype(np.int64))
  return events.sort_values(["userId", "timestamp"], kind="stable")


def _kcore(events, min_user, min_item):
  while True:
    user_n = events["userId"].map(events["userId"].value_counts())
    kept = events[user_n >= min_user]
    item_n = kept["parent_asin"].map(kept["parent_asin"].value_counts())
    kept = kept[item_n >= min_item]
    if len(kept) == len(events):
      return kept
    events = kept


def _hit_rates(books, events, k=20):
  """Leave-last-out hit rate@k of global vs top-category popularity.

  Both recommenders rank the training events' most popular books the user
  has not seen; the category one first restricts them to the top-level
  category seen most often in the user's history.
  """
  top = {asin: json.loads(c)[1] if c != "[]" else ""
         for asin, c in zip(books["parent_asin"], books["categories"])}
  last = ~events["userId"].duplicated(keep="last")
  train, test = events[~last], events[last]
  popular = train["parent_asin"].value_counts()  # ties: first seen first
  ranked = popular.index.to_numpy()
  ranked_top = np.array([top[a] for a in ranked])
  history = train.groupby("userId")["parent_asin"].apply(list)
  hits = {"global": 0, "category": 0}
  users = 0
  for user, target in zip(test["userId"], test["parent_asin"]):
    seen = history.get(user, [])
    if len(seen) < 2:
      continue
    users += 1
    fresh = ~np.isin(ranked, seen)
    hits["global"] += target in ranked[fresh][:k]
    tops = pd.Series([top[a] for a in seen if top[a]]).value_counts()
    favourite = tops.index[0] if len(tops) else ""
    in_top = ranked[fresh & (ranked_top == favourite)][:k]
    hits["category"] += target in in_top
  return {name: hit / users for name, hit in hits.items()}, users


def test_category_history_beats_popularity(tmp_path):
  config = synth.SynthConfig(num_books=2000, num_users=400, num_events=10000,
                             seed=11)
  synth.generate(str(tmp_path), config)
  books, events = _read(str(tmp_path))
  rates, users = _hit_rates(books, _clean_events(books, events))
  assert users >= 300
  # Measured here: global 0.16, category 0.31 (seeds 1-3: +0.11 to +0.16).
  # With ~370 users the standard error of the gap is ~0.03, so the
  # thresholds below sit several standard errors under the measured gap.
  assert rates["category"] >= 1.5 * rates["global"], rates
  assert rates["category"] - rates["global"] >= 0.08, rates


def test_default_config_survives_kcore(tmp_path):
  config = synth.SynthConfig()
  counts = synth.generate(str(tmp_path), config)
  assert 0.9 * config.num_events <= counts["events"] <= 1.05 * config.num_events
  books, events = _read(str(tmp_path))
  core = _kcore(_clean_events(books, events), min_user=5, min_item=10)
  assert core["userId"].nunique() >= 1500
  assert core["parent_asin"].nunique() >= 1000
  assert len(core) >= 40000


def test_command_line_writes_gzip(tmp_path):
  subprocess.run(
      [sys.executable, "-m", "tt_mimic", "synth", f"--out_dir={tmp_path}",
       "--num_books=200", "--num_users=100", "--num_events=2000", "--seed=7",
       "--gzip"], check=True, capture_output=True)
  books, events = _read(str(tmp_path), "books.csv.gz", "users.csv.gz")
  assert len(books) == TINY.num_books
  assert events["userId"].nunique() == TINY.num_users


def test_synth_command_leaves_global_flags_alone():
  # The other commands define --seed etc. in absl's global FLAGS; the synth
  # command keeps its flags in its own registry so both can be imported.
  from tt_mimic.commands import synth as synth_command  # pylint: disable=g-import-not-at-top
  for name in ("out_dir", "num_books", "num_users", "num_events", "seed",
               "gzip", "dirt"):
    own = synth_command._FLAGS[name]
    assert name not in flags.FLAGS or flags.FLAGS[name] is not own, name
