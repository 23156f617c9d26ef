"""Tests for tt_mimic.data.ingest: CSV -> validated, pruned, split artifacts."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import tiny_data
from tt_mimic.config import IngestConfig
from tt_mimic.data import ingest


# ------------------------------------------------------------------ helpers


def _write(path, frame):
  """Writes a frame of strings/ints as CSV (gzipped if path ends in .gz)."""
  frame.to_csv(path, index=False)
  return str(path)


# Small test times are offsets from T0 (2020-09-13 in epoch ms): ingest
# refuses a file whose timestamps look like seconds (below 1e11 ms).
T0 = tiny_data.BASE_MS


def _events_csv(path, rows, columns=("parent_asin", "userId", "timestamp")):
  """Writes events; integer timestamps are written as T0 + the value."""
  frame = pd.DataFrame(rows, columns=list(columns))
  frame["timestamp"] = [T0 + t if isinstance(t, int) else t
                        for t in frame["timestamp"]]
  return _write(path, frame)


def _books_csv(path, asins):
  return _write(path, pd.DataFrame({
      "parent_asin": list(asins),
      "title": [json.dumps([f"Title {a}"]) for a in asins],
      "author": ["Someone"] * len(asins),
      "average_rating": ["4.0"] * len(asins),
      "rating_number": ["3"] * len(asins),
      "price": ["9.99"] * len(asins),
      "categories": ['["Books"]'] * len(asins)}))


def _config(books_csv, users_csv, **overrides):
  params = dict(books_limit=0, interactions_limit=0, min_user_interactions=1,
                min_item_interactions=1)
  params.update(overrides)
  return IngestConfig(str(books_csv), str(users_csv), **params)


def _triples(result, t0=0):
  """The kept events as a set of (userId, parent_asin, timestamp - t0)."""
  ev = result.events
  users = result.users[ev["user"].to_numpy() - 1]
  asins = result.items["parent_asin"].to_numpy()[ev["item"].to_numpy() - 1]
  return set(zip(users, asins, (ev["timestamp"] - t0).tolist()))


def _stable_report(report):
  return {k: v for k, v in report.items() if k not in ("config", "seconds")}


def _assert_same_result(a, b):
  pd.testing.assert_frame_equal(a.events, b.events)
  pd.testing.assert_frame_equal(a.items, b.items)
  np.testing.assert_array_equal(a.users, b.users)
  assert _stable_report(a.report) == _stable_report(b.report)


def _reference(books, events, min_user, min_item):
  """Brute-force pandas pipeline: dedupe earliest, known books, k-core."""
  ev = events.assign(timestamp=events["timestamp"].astype(np.int64))
  ev = ev.sort_values("timestamp", kind="stable")
  ev = ev.drop_duplicates(["userId", "parent_asin"], keep="first")
  ev = ev[ev["parent_asin"].isin(set(books["parent_asin"]))]
  while True:
    user_n = ev.groupby("userId")["userId"].transform("size")
    item_n = ev.groupby("parent_asin")["parent_asin"].transform("size")
    ok = (user_n >= min_user) & (item_n >= min_item)
    if ok.all():
      break
    ev = ev[ok]
  return set(zip(ev["userId"], ev["parent_asin"], ev["timestamp"].tolist()))


# ---------------------------------------------------------- artifacts shape


def test_run_artifacts_match_brute_force_reference(dataset_writer):
  ds = dataset_writer(n_users=30, n_items=12, events_per_user=6, seed=3,
                      ties=True)
  result = ingest.run(ds.config(min_user_interactions=3,
                                min_item_interactions=8))
  ev = result.events
  assert list(ev.columns) == ["user", "item", "timestamp", "split"]
  assert ev.dtypes.to_dict() == {
      "user": np.int32, "item": np.int32, "timestamp": np.int64,
      "split": np.int8}
  # sorted by (user, timestamp, item); ids are 1-based and dense
  order = ev.sort_values(["user", "timestamp", "item"], kind="stable")
  assert order.index.tolist() == list(range(len(ev)))
  assert ev["user"].min() == 1 and ev["user"].max() == len(result.users)
  assert set(ev["item"]) == set(range(1, len(result.items) + 1))
  assert list(result.users) == sorted(result.users)
  assert list(result.items["parent_asin"]) == sorted(
      result.items["parent_asin"])
  assert _triples(result) == _reference(ds.books, ds.events, 3, 8)
  # train_count is the number of training events per corpus item
  train = ev[ev["split"] == ingest.SPLIT_TRAIN]
  expected = train["item"].value_counts().reindex(
      range(1, len(result.items) + 1), fill_value=0).to_numpy()
  np.testing.assert_array_equal(result.items["train_count"], expected)
  # the item table carries the book features of its parent_asin
  books = ds.books.set_index("parent_asin")
  for row in result.items.itertuples():
    assert row.title == json.loads(books.loc[row.parent_asin, "title"])[0]


# ----------------------------------------------------------- schema variants


def test_schema_variants_give_identical_results(tiny_dataset, tmp_path):
  ds = tiny_dataset
  base = ingest.run(ds.config())
  books = pd.read_csv(ds.books_csv, dtype=str, keep_default_na=False)
  users = pd.read_csv(ds.users_csv, dtype=str, keep_default_na=False)
  extra_books = books.assign(
      main_category="Books", images='[{"large": "http://x/y.jpg, z"}]',
      details='{"Publisher": "A, B"}')
  extra_books = extra_books[["images"] + list(books.columns)
                            + ["main_category", "details"]]
  extra_users = users.assign(rating="5.0", text='Great, "really" great')
  extra_users = extra_users[["rating", "parent_asin", "text", "userId",
                             "timestamp"]]
  variants = {
      "reordered": (books[books.columns[::-1]], users[users.columns[::-1]],
                    ".csv"),
      "extra_columns": (extra_books, extra_users, ".csv"),
      "gzip": (books, users, ".csv.gz"),
      "all_at_once": (extra_books[extra_books.columns[::-1]], extra_users,
                      ".csv.gz"),
  }
  for name, (b, u, suffix) in variants.items():
    directory = tmp_path / name
    directory.mkdir()
    result = ingest.run(_config(_write(directory / f"books{suffix}", b),
                                _write(directory / f"users{suffix}", u)))
    if "rating" in u:  # a rating column is kept (issue 13); other extras not
      assert (result.events.pop("rating") == 5.0).all()
      assert result.report["invalid_values"].pop("rating")["missing"] == 0
    _assert_same_result(base, result)


def test_gzip_inputs_from_writer(dataset_writer):
  plain = dataset_writer(seed=5)
  gz = dataset_writer(seed=5, suffix=".csv.gz")
  with open(gz.users_csv, "rb") as f:
    assert f.read(2) == b"\x1f\x8b"
  _assert_same_result(ingest.run(plain.config()), ingest.run(gz.config()))


# ------------------------------------------------- dedupe, unknown, limits


def test_dedupe_keeps_earliest_and_unknown_books_are_counted(tmp_path):
  books = _books_csv(tmp_path / "books.csv", ["A", "B", "C"])
  users = _events_csv(tmp_path / "users.csv", [
      ("A", "u1", 300), ("A", "u1", 100), ("A", "u1", 200),
      ("B", "u1", 150), ("B", "u1", 150),
      ("C", "u2", 50), ("ZZZ", "u2", 60), ("ZZZ", "u3", 70),
      ("ZZZ", "u3", 70)])
  result = ingest.run(_config(books, users))
  assert _triples(result, T0) == {("u1", "A", 100), ("u1", "B", 150),
                              ("u2", "C", 50)}
  dropped = result.report["events"]["dropped"]
  assert dropped["duplicate_event"] == 4  # A x2, B x1, ZZZ/u3 x1
  assert dropped["unknown_book"] == 2  # ZZZ for u2 and u3
  assert list(result.users) == ["u1", "u2"]  # u3 only had unknown books
  stages = {s["stage"]: s for s in result.report["stages"]}
  assert stages["valid"]["events"] == 9
  assert stages["deduplicated"]["events"] == 5
  assert stages["known_books"]["events"] == 3


def test_invalid_event_fields_are_dropped_by_first_reason(tmp_path):
  books = _books_csv(tmp_path / "books.csv", ["A", "B"])
  users = _events_csv(tmp_path / "users.csv", [
      ("A", "u1", 100), (" B ", " u1 ", f" {T0 + 200} "), ("A", "", 5),
      ("", "u2", 5), ("", "", ""), ("A", "u3", "yesterday"),
      ("A", "u4", "-5"), ("A", "u5", "")])
  result = ingest.run(_config(books, users))
  assert _triples(result, T0) == {("u1", "A", 100), ("u1", "B", 200)}
  dropped = result.report["events"]["dropped"]
  assert dropped["missing_user_id"] == 2
  assert dropped["missing_parent_asin"] == 1
  assert dropped["invalid_timestamp"] == 3


def test_books_limit_keeps_first_valid_books(tmp_path):
  books = _write(tmp_path / "books.csv", pd.DataFrame({
      "parent_asin": ["A", "", "A", "B", "C", "D"],
      "title": ['["a"]', '["none"]', '["a dup"]', '["b"]', '["c"]', '["d"]'],
      "author": "x", "average_rating": "1", "rating_number": "1",
      "price": "1", "categories": "[]"}))
  users = _events_csv(tmp_path / "users.csv", [
      ("A", "u1", 1), ("B", "u1", 2), ("C", "u1", 3), ("D", "u2", 4),
      ("A", "u2", 5)])
  result = ingest.run(_config(books, users, books_limit=2))
  report = result.report
  assert report["books"]["read"] == 6
  assert report["books"]["kept"] == 2
  assert report["books"]["dropped"] == {
      "missing_parent_asin": 1, "duplicate_parent_asin": 1,
      "over_books_limit": 2}
  assert list(result.items["parent_asin"]) == ["A", "B"]
  assert result.items.loc[0, "title"] == "a"  # the first row of A wins
  assert report["events"]["dropped"]["unknown_book"] == 2


def test_interactions_limit_keeps_first_valid_events_in_file_order(tmp_path):
  books = _books_csv(tmp_path / "books.csv", ["A", "B", "C", "D"])
  users = _events_csv(tmp_path / "users.csv", [
      ("A", "u1", 40), ("A", "u1", 50), ("ZZZ", "u1", 1), ("B", "u2", 30),
      ("", "u2", 1), ("C", "u3", 20), ("D", "u4", 10), ("D", "u1", 5)])
  result = ingest.run(_config(books, users, interactions_limit=3))
  assert _triples(result, T0) == {("u1", "A", 40), ("u2", "B", 30),
                              ("u3", "C", 20)}
  dropped = result.report["events"]["dropped"]
  assert dropped["over_interactions_limit"] == 2
  assert [s["stage"] for s in result.report["stages"]] == [
      "valid", "deduplicated", "known_books", "interactions_limit", "kcore"]
  assert result.report["stages"][3]["events"] == 3
  no_cap = ingest.run(_config(books, users, interactions_limit=0))
  assert len(no_cap.events) == 5
  assert "over_interactions_limit" not in no_cap.report["events"]["dropped"]


# --------------------------------------------------------------- k-core


def test_kcore_needs_several_rounds(tmp_path):
  # min 2/2. Round 1 prunes user s (1 event), which leaves item X with one
  # event, so X goes; that leaves user m with one event (round 2), then item
  # Y, then user a (round 3). The 2x2 core {c1, c2} x {P, Q} survives.
  books = _books_csv(tmp_path / "books.csv", ["P", "Q", "X", "Y"])
  users = _events_csv(tmp_path / "users.csv", [
      ("X", "s", 1), ("X", "m", 2), ("Y", "m", 3), ("Y", "a", 4),
      ("P", "a", 5), ("P", "c1", 6), ("Q", "c1", 7), ("P", "c2", 8),
      ("Q", "c2", 9)])
  result = ingest.run(_config(books, users, min_user_interactions=2,
                              min_item_interactions=2))
  assert _triples(result, T0) == {("c1", "P", 6), ("c1", "Q", 7),
                              ("c2", "P", 8), ("c2", "Q", 9)}
  assert result.report["kcore_rounds"] >= 3
  dropped = result.report["events"]["dropped"]
  assert dropped["kcore_user"] == 3 and dropped["kcore_item"] == 2
  # ingest.kcore itself, on a frame, with a fresh report
  raw = pd.read_csv(users, dtype={"timestamp": np.int64})
  kept = ingest.kcore(raw, 2, 2, ingest.Report())
  assert sorted(kept["userId"].unique()) == ["c1", "c2"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("min_user, min_item", [(3, 9), (4, 8), (2, 11)])
def test_kcore_property_and_maximality(dataset_writer, seed, min_user,
                                       min_item):
  # A random 75% of 40 users x 6 of 15 books: uneven degrees, so pruning
  # cascades over several rounds (checked against a brute-force k-core).
  ds = dataset_writer(n_users=40, n_items=15, events_per_user=6, seed=seed)
  events = ds.events.sample(frac=0.75, random_state=seed)
  users = _write(os.path.dirname(ds.users_csv) + "/sampled.csv", events)
  expected = _reference(ds.books, events, min_user, min_item)
  assert expected, "parameters chosen so that the core is not empty"
  result = ingest.run(_config(ds.books_csv, users,
                              min_user_interactions=min_user,
                              min_item_interactions=min_item))
  ev = result.events
  assert ev.groupby("user").size().min() >= min_user
  assert ev.groupby("item").size().min() >= min_item
  assert _triples(result) == expected
  assert result.report["kcore_rounds"] >= 3
  dropped = result.report["events"]["dropped"]
  assert dropped["kcore_user"] + dropped["kcore_item"] == len(events) - len(
      expected)


# ---------------------------------------------------------------- splits


@pytest.mark.parametrize("ties", [False, True])
def test_leave_last_out_split(dataset_writer, ties):
  ds = dataset_writer(n_users=20, n_items=10, events_per_user=5, seed=11,
                      ties=ties)
  events = ds.events.copy()
  user_ids = sorted(events["userId"].unique())
  short = events["userId"].isin(user_ids[:2])
  events = events[~short | (events.groupby("userId").cumcount() < 2)]
  users = _write(os.path.dirname(ds.users_csv) + "/short.csv", events)
  result = ingest.run(_config(ds.books_csv, users))
  for _, group in result.events.groupby("user"):
    split, ts = group["split"].to_numpy(), group["timestamp"].to_numpy()
    if len(group) < 3:
      assert (split == ingest.SPLIT_TRAIN).all()
      continue
    assert (split[:-2] == ingest.SPLIT_TRAIN).all()
    assert split[-2] == ingest.SPLIT_VAL and split[-1] == ingest.SPLIT_TEST
    assert ts[-1] == ts.max()  # test is the latest event
    assert ts[-2] >= ts[:-2].max()  # val is the one before
    assert ts[-1] >= ts[-2]
    if not ties:
      assert ts[-1] > ts[:-1].max()
  n_short = result.events.groupby("user").size().lt(3).sum()
  assert n_short == 2
  splits = result.report["splits"]
  # every user but the two short ones has a validation and a test event
  assert splits["test"]["users"] == splits["val"]["users"] == len(user_ids) - 2
  assert splits["test"]["events"] == len(user_ids) - 2
  assert sum(s["events"] for s in splits.values()) == len(result.events)


def test_temporal_split_with_cutoff(tiny_dataset):
  ts_all = np.sort(tiny_dataset.events["timestamp"].to_numpy())
  cutoff = int(ts_all[len(ts_all) * 3 // 4])
  result = ingest.run(tiny_dataset.config(
      split="temporal", split_cutoff_ms=cutoff, val_fraction=0.2))
  ev = result.events
  split, ts = ev["split"].to_numpy(), ev["timestamp"].to_numpy()
  test, val, train = (split == ingest.SPLIT_TEST, split == ingest.SPLIT_VAL,
                      split == ingest.SPLIT_TRAIN)
  np.testing.assert_array_equal(test, ts >= cutoff)
  assert (ts[val | train] < cutoff).all()
  assert val.any() and train.any()
  assert ts[val].min() >= ts[train].max()  # val is the latest pre-cutoff
  assert val.sum() == pytest.approx(0.2 * (~test).sum(), abs=1)


def test_temporal_split_default_cutoff_is_quantile(tiny_dataset):
  result = ingest.run(tiny_dataset.config(split="temporal",
                                          split_cutoff_ms=0))
  ts = result.events["timestamp"].to_numpy()
  cutoff = int(np.quantile(ts, 0.9))
  test = result.events["split"].to_numpy() == ingest.SPLIT_TEST
  np.testing.assert_array_equal(test, ts >= cutoff)
  assert 0 < test.sum() <= np.ceil(0.1 * len(ts)) + 1


def test_temporal_cutoff_before_all_events_is_an_error(tiny_dataset):
  with pytest.raises(ingest.IngestError, match="no training events"):
    ingest.run(tiny_dataset.config(split="temporal", split_cutoff_ms=1))


def test_unknown_split_is_refused_by_the_config(tiny_dataset):
  with pytest.raises(ValueError, match="split.*'random' is not one of"):
    tiny_dataset.config(split="random")


def test_temporal_split_val_fraction_zero_has_no_validation(tiny_dataset):
  result = ingest.run(tiny_dataset.config(split="temporal",
                                          val_fraction=0.0))
  assert result.report["splits"]["val"]["events"] == 0


# ----------------------------------------------------------- determinism


def test_same_input_twice_gives_identical_events(dataset_writer):
  ds = dataset_writer(n_users=15, n_items=8, events_per_user=4, seed=4,
                      ties=True)
  config = ds.config(min_user_interactions=2, min_item_interactions=2)
  _assert_same_result(ingest.run(config), ingest.run(config))


def test_shuffled_rows_with_distinct_timestamps_give_same_result(
    dataset_writer):
  ds = dataset_writer(n_users=15, n_items=8, events_per_user=4, seed=9)
  assert ds.events["timestamp"].is_unique
  # duplicate events with distinct timestamps: the earliest must win
  events = pd.concat([ds.events, ds.events.iloc[:10].assign(
      timestamp=ds.events["timestamp"].iloc[:10] + 7)], ignore_index=True)
  directory = os.path.dirname(ds.users_csv)
  original = _write(directory + "/orig.csv", events)
  shuffled = _write(directory + "/shuffled.csv", events.sample(
      frac=1.0, random_state=123))
  config = dict(min_user_interactions=2, min_item_interactions=3)
  _assert_same_result(ingest.run(_config(ds.books_csv, original, **config)),
                      ingest.run(_config(ds.books_csv, shuffled, **config)))


# ---------------------------------------------------------------- report


def test_report_counts_add_up_and_summary_names_reasons(tmp_path):
  books = _write(tmp_path / "books.csv", pd.DataFrame({
      "parent_asin": ["A", "B", "C", "", "A"], "title": '["t"]',
      "author": "x", "average_rating": ["1", "x", "", "2", "3"],
      "rating_number": "1", "price": ["-1", "2", "inf", "", ""],
      "categories": "[]"}))
  users = _events_csv(tmp_path / "users.csv", [
      ("A", "u1", 1), ("B", "u1", 2), ("C", "u1", 3), ("A", "u1", 4),
      ("A", "u2", 1), ("B", "u2", 2), ("ZZZ", "u2", 3), ("A", "u3", 1),
      ("", "u3", 1), ("A", "u4", "bad")])
  result = ingest.run(_config(books, users, min_user_interactions=2,
                              min_item_interactions=1))
  report = result.report
  for table in ("books", "events"):
    part = report[table]
    assert part["read"] == part["kept"] + sum(part["dropped"].values())
  assert report["books"]["read"] == 5 and report["events"]["read"] == 10
  assert report["events"]["kept"] == len(result.events) == 5
  assert [s["stage"] for s in report["stages"]] == [
      "valid", "deduplicated", "known_books", "kcore"]
  for stage in report["stages"]:
    assert set(stage) == {"stage", "events", "users", "items"}
  assert report["splits"]["train"]["events"] + report["splits"]["val"][
      "events"] + report["splits"]["test"]["events"] == 5
  assert report["config"]["min_user_interactions"] == 2
  json.dumps(report)  # serializable as is
  text = ingest.summary(report)
  for reason in ("missing_parent_asin=1", "duplicate_parent_asin=1",
                 "duplicate_event=1", "unknown_book=1", "kcore_user=1",
                 "invalid_timestamp=1", "after kcore", "price=",
                 "non_finite", "splits:"):
    assert reason in text, (reason, text)


def test_check_counts_rejects_inconsistent_report():
  with pytest.raises(AssertionError, match="events counts do not add up"):
    ingest.check_counts({
        "books": {"read": 1, "kept": 1, "dropped": {}},
        "events": {"read": 3, "kept": 1, "dropped": {"x": 1}}})


# ---------------------------------------------------------------- errors


def test_missing_files_are_named(tiny_dataset, tmp_path):
  missing = str(tmp_path / "nope" / "books.csv")
  with pytest.raises(ingest.IngestError, match="books file not found") as e:
    ingest.run(_config(missing, tiny_dataset.users_csv))
  assert missing in str(e.value)
  missing = str(tmp_path / "users.csv.gz")
  for call in (lambda c: ingest.run(c),
               lambda c: ingest.run_cached(c, str(tmp_path / "run"))):
    with pytest.raises(ingest.IngestError, match="users file not found") as e:
      call(_config(tiny_dataset.books_csv, missing))
    assert missing in str(e.value)


def test_missing_columns_are_named_with_the_columns_found(tiny_dataset,
                                                          tmp_path):
  books = pd.read_csv(tiny_dataset.books_csv, dtype=str)
  path = _write(tmp_path / "books_cols.csv",
                books.drop(columns=["price", "author"]))
  with pytest.raises(ingest.IngestError) as e:
    ingest.run(_config(path, tiny_dataset.users_csv))
  message = str(e.value)
  assert path in message
  assert "missing required column(s) ['author', 'price']" in message
  assert "columns found" in message and "'categories'" in message
  path = _write(tmp_path / "users_cols.csv", tiny_dataset.events.rename(
      columns={"timestamp": "time"}))
  with pytest.raises(ingest.IngestError) as e:
    ingest.run(_config(tiny_dataset.books_csv, path))
  message = str(e.value)
  assert path in message and "['timestamp']" in message
  assert "'time'" in message and "'userId'" in message


def test_empty_file_is_an_ingest_error(tiny_dataset, tmp_path):
  empty = tmp_path / "empty.csv"
  empty.write_text("")
  with pytest.raises(ingest.IngestError, match="empty"):
    ingest.run(_config(tiny_dataset.books_csv, empty))


def test_inputs_that_filter_to_nothing_name_the_stage(tiny_dataset,
                                                      tmp_path):
  ds = tiny_dataset
  unknown = _write(tmp_path / "unknown.csv",
                   ds.events.assign(parent_asin="NOT_A_BOOK"))
  with pytest.raises(ingest.IngestError,
                     match="No events are left after stage 'known_books'"):
    ingest.run(_config(ds.books_csv, unknown))
  with pytest.raises(ingest.IngestError,
                     match="No events are left after stage 'kcore'") as e:
    ingest.run(ds.config(min_user_interactions=100))
  assert "kcore_user" in str(e.value)
  invalid = _write(tmp_path / "invalid.csv", ds.events.assign(timestamp=""))
  with pytest.raises(ingest.IngestError,
                     match="No events are left after stage 'valid'") as e:
    ingest.run(_config(ds.books_csv, invalid))
  assert "invalid_timestamp" in str(e.value)
  no_books = _write(tmp_path / "no_books.csv",
                    ds.books.assign(parent_asin=" "))
  with pytest.raises(ingest.IngestError, match="No valid books in") as e:
    ingest.run(_config(no_books, ds.users_csv))
  assert no_books in str(e.value) and "missing_parent_asin" in str(e.value)


# ----------------------------------------------------------------- cache


def test_run_cached_reuses_artifacts(tiny_dataset, tmp_path, monkeypatch):
  model_dir = str(tmp_path / "run")
  config = tiny_dataset.config(min_user_interactions=2)
  calls = []
  real_run = ingest.run

  def counting_run(c):
    calls.append(c)
    return real_run(c)

  monkeypatch.setattr(ingest, "run", counting_run)
  first = ingest.run_cached(config, model_dir)
  assert len(calls) == 1
  key_dir = os.path.join(model_dir, "ingest", ingest.cache_key(config))
  for name in ("items.parquet", "events.parquet", "users.parquet",
               "ingest_report.json"):
    assert os.path.exists(os.path.join(key_dir, name))
  with open(os.path.join(model_dir, "ingest_report.json")) as f:
    assert json.load(f)["events"]["kept"] == len(first.events)

  def failing_run(c):
    raise AssertionError("run() called although the cache should hit")

  monkeypatch.setattr(ingest, "run", failing_run)
  second = ingest.run_cached(config, model_dir)
  pd.testing.assert_frame_equal(first.events, second.events)
  np.testing.assert_array_equal(first.users, second.users)
  assert list(first.items["parent_asin"]) == list(second.items["parent_asin"])
  assert second.items["categories"].tolist() == first.items[
      "categories"].tolist()
  np.testing.assert_array_equal(first.items["price"], second.items["price"])
  assert second.report == json.loads(json.dumps(first.report))

  # a changed parameter is a new key and a new ingest
  monkeypatch.setattr(ingest, "run", counting_run)
  changed = dataclasses.replace(config, min_user_interactions=3)
  assert ingest.cache_key(changed) != ingest.cache_key(config)
  ingest.run_cached(changed, model_dir)
  assert len(calls) == 2 and calls[-1] == changed
  assert len(os.listdir(os.path.join(model_dir, "ingest"))) == 2


def test_the_cache_key_names_the_files_not_their_spelling(tiny_dataset,
                                                          tmp_path,
                                                          monkeypatch):
  config = tiny_dataset.config()
  key = ingest.cache_key(config)
  books_dir, books = os.path.split(os.path.realpath(config.books_csv))
  users_dir, users = os.path.split(os.path.realpath(config.users_csv))
  # Relative to the working directory, with "./", and through a symlink.
  monkeypatch.chdir(books_dir)
  relative = dataclasses.replace(
      config, books_csv=books,
      users_csv=os.path.relpath(os.path.join(users_dir, users)))
  assert ingest.cache_key(relative) == key
  assert ingest.cache_key(dataclasses.replace(
      relative, books_csv=os.path.join(".", books))) == key
  os.symlink(books_dir, tmp_path / "linked")
  assert ingest.cache_key(dataclasses.replace(
      config, books_csv=str(tmp_path / "linked" / books))) == key
  # Another file is another key.
  other = tmp_path / "other.csv"
  shutil.copy(os.path.join(books_dir, books), other)
  assert ingest.cache_key(dataclasses.replace(
      config, books_csv=str(other))) != key


def test_run_cached_reingests_when_an_input_file_changes(dataset_writer,
                                                         tmp_path,
                                                         monkeypatch):
  ds = dataset_writer()
  calls = []
  real_run = ingest.run
  monkeypatch.setattr(ingest, "run", lambda c: calls.append(c) or real_run(c))
  cache_dir = str(tmp_path / "cache")
  ingest.run_cached(ds.config(), str(tmp_path / "run"), cache_dir)
  ingest.run_cached(ds.config(), str(tmp_path / "run2"), cache_dir)
  assert len(calls) == 1  # shared cache_dir, other model_dir: still a hit
  assert os.path.exists(str(tmp_path / "run2" / "ingest_report.json"))
  ds.events.iloc[:-1].to_csv(ds.users_csv, index=False)
  result = ingest.run_cached(ds.config(), str(tmp_path / "run"), cache_dir)
  assert len(calls) == 2
  assert result.report["events"]["read"] == len(ds.events) - 1


def test_write_dataset_is_deterministic(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  a = tiny_data.write_dataset(tmp_path / "a", seed=7, ties=True)
  b = tiny_data.write_dataset(tmp_path / "b", seed=7, ties=True)
  for x, y in ((a.books_csv, b.books_csv), (a.users_csv, b.users_csv)):
    with open(x, "rb") as f, open(y, "rb") as g:
      assert f.read() == g.read()
  assert not a.events.duplicated(["userId", "parent_asin"]).any()
  tiny = tiny_data.SIZES["tiny"]
  assert len(a.events) == tiny["n_users"] * tiny["events_per_user"]
  assert a.events.groupby("userId").size().eq(tiny["events_per_user"]).all()
  assert a.events["parent_asin"].isin(a.books["parent_asin"]).all()


@pytest.mark.parametrize("size", sorted(tiny_data.SIZES))
def test_write_dataset_has_the_structure_tests_rely_on(tmp_path, size):
  # What the model, training and serving tests take for granted.
  ds = tiny_data.write_dataset(tmp_path, size)
  p = tiny_data.SIZES[size]
  books, events = ds.books, ds.events
  assert len(books) == p["n_items"] and books["parent_asin"].is_unique
  assert events["userId"].nunique() == p["n_users"]
  assert not events.duplicated(["userId", "parent_asin"]).any()
  assert events["parent_asin"].isin(books["parent_asin"]).all()
  assert events["timestamp"].is_unique
  # Each genre has its own top-level category (where a book has one).
  tops = books["categories"].map(lambda c: (json.loads(c) or [None] * 2)[1])
  for g in range(p["n_genres"]):
    assert set(tops[ds.book_genre == g].dropna()) == {
        tiny_data.GENRES[g].top}
  # Users read their genre as often as `preference` says.
  genre = dict(zip(books["parent_asin"], ds.book_genre))
  user = {tiny_data.user_id(u): g for u, g in enumerate(ds.user_genre)}
  own = np.mean([genre[a] == user[u] for a, u in zip(events["parent_asin"],
                                                     events["userId"])])
  chance = 1 / p["n_genres"]
  assert own == pytest.approx(p["preference"] + (1 - p["preference"]) * chance,
                              abs=0.1)
  # Rank 0 is its genre's most read book (the serving tests name them), and
  # popular books have more ratings.
  reads = events["parent_asin"].value_counts()
  numbers = books.set_index("parent_asin")["rating_number"].astype(int)
  for g in range(p["n_genres"] if p["popularity"] > 0 else 0):
    first = tiny_data.asin(g, 0)
    genre_reads = reads.reindex(books["parent_asin"][ds.book_genre == g],
                                fill_value=0)
    assert genre_reads[first] == genre_reads.max(), (size, g)
    assert numbers[first] == numbers[genre_reads.index].max(), (size, g)


def test_write_dataset_dirt(tmp_path):
  (tmp_path / "dirty").mkdir()
  (tmp_path / "clean").mkdir()
  dirty = tiny_data.write_dataset(tmp_path / "dirty").books
  assert dirty["title"].str.contains(r'\\"').any()  # a quote inside
  assert dirty["title"].map(lambda t: "," in json.loads(t)[0]).all()
  assert {"Unknown", ""} <= set(dirty["author"])
  assert (dirty["categories"] == "[]").any() and (dirty["price"] == "").any()
  clean = tiny_data.write_dataset(tmp_path / "clean", dirt=False).books
  assert not clean["title"].str.contains(r'\\"').any()
  assert not {"Unknown", ""} & set(clean["author"])
  assert (clean["categories"] != "[]").all() and (clean["price"] != "").all()
  empty = tiny_data.write_dataset(tmp_path, empty_numerics=True).books
  for column in ("average_rating", "rating_number", "price"):
    assert (empty[column] == "").all(), column


# ------------------------------------------------------------------- CLI


def _cli(tmp_path, *args):
  return subprocess.run(
      [sys.executable, "-m", "tt_mimic", "ingest", *args],
      cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
      check=False)


def test_cli_writes_report(tiny_dataset, tmp_path):
  model_dir = tmp_path / "model"
  proc = _cli(tmp_path, f"--books_csv={tiny_dataset.books_csv}",
              f"--users_csv={tiny_dataset.users_csv}",
              f"--model_dir={model_dir}", "--min_user_interactions=1",
              "--min_item_interactions=1")
  assert proc.returncode == 0, proc.stderr
  with open(model_dir / "ingest_report.json") as f:
    report = json.load(f)
  assert report["events"]["read"] == len(tiny_dataset.events)
  assert report["events"]["kept"] == len(tiny_dataset.events)
  assert report["books"]["read"] == report["books"]["kept"] == len(
      tiny_dataset.books)
  assert report["config"]["users_csv"] == tiny_dataset.users_csv


def test_cli_missing_column_exits_with_readable_message(tiny_dataset,
                                                        tmp_path):
  users = _write(tmp_path / "users_bad.csv",
                 tiny_dataset.events.drop(columns=["timestamp"]))
  proc = _cli(tmp_path, f"--books_csv={tiny_dataset.books_csv}",
              f"--users_csv={users}", f"--model_dir={tmp_path / 'model'}")
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  assert "ingest failed" in proc.stderr
  assert "missing required column(s) ['timestamp']" in proc.stderr
  assert users in proc.stderr


def test_cli_missing_file_exits_with_readable_message(tmp_path):
  proc = _cli(tmp_path, f"--books_csv={tmp_path / 'none.csv'}",
              f"--users_csv={tmp_path / 'none2.csv'}",
              f"--model_dir={tmp_path / 'model'}")
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  assert "file not found" in proc.stderr


def test_rows_with_surplus_trailing_fields_are_read_and_counted(tmp_path):
  # pyarrow rejects the ragged row; the python-engine fallback keeps it.
  books = _books_csv(tmp_path / "books.csv", ["A", "B"])
  users = tmp_path / "users.csv"
  users.write_text(f"parent_asin,userId,timestamp\nA,u1,{T0}\nB,u1,{T0}\n"
                   f"B,u2,{T0},surplus\n")
  result = ingest.run(_config(books, str(users)))
  assert result.report["events"]["read"] == 3
  assert len(result.events) + sum(
      result.report["events"]["dropped"].values()) == 3


# ------------------------------------------------- regressions of fixed bugs


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
def test_out_of_range_timestamps_are_invalid(tmp_path):
  books = _books_csv(tmp_path / "books.csv", ["A", "B", "C"])
  users = _events_csv(tmp_path / "users.csv", [
      ("A", "u1", 100), ("B", "u1", "inf"), ("C", "u1", "1e30")])
  result = ingest.run(_config(books, users))
  assert result.report["events"]["dropped"]["invalid_timestamp"] == 2
  assert (result.events["timestamp"] >= 0).all()


def test_short_rows_are_counted_not_crashing(tmp_path):
  books = _books_csv(tmp_path / "books.csv", ["A", "B"])
  users = tmp_path / "users.csv"
  users.write_text(f"parent_asin,timestamp,userId\nA,{T0 + 100},u1\n"
                   f"B,{T0 + 200},u1\nB,{T0 + 300}\n")
  result = ingest.run(_config(books, str(users)))
  assert result.report["events"]["read"] == 3
  assert result.report["events"]["dropped"]["malformed_row"] == 1
  assert _triples(result, T0) == {("u1", "A", 100), ("u1", "B", 200)}


def test_padded_header_names_are_accepted(tiny_dataset, tmp_path):
  with open(tiny_dataset.users_csv) as f:
    text = f.read().split("\n", 1)
  path = tmp_path / "users_padded.csv"
  path.write_text("parent_asin, userId ,timestamp\n" + text[1])
  assert text[0] == "parent_asin,userId,timestamp"
  _assert_same_result(ingest.run(tiny_dataset.config()),
                      ingest.run(_config(tiny_dataset.books_csv, path)))
