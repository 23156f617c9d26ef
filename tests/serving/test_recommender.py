"""Tests for tt_mimic.serving.recommender on the served run
(tests/serving/conftest.py): known and unknown users, histories, k, the
example printed after training, and the `tt-mimic recommend` command line.
"""

from __future__ import annotations

import json
import os
import types

import numpy as np
import pandas as pd
import pytest

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tt_mimic.serving import recommender as recommend

import tiny_data

K = tiny_data.SERVING_FLAGS["export_k"]

pytestmark = pytest.mark.xdist_group("serving")  # see conftest.py


def test_known_user_matches_the_index(run, brute_rec, users):
  # with_history with nothing given and nothing excluded: the stored
  # history, every book (serving_default also excludes the read ones).
  raw = brute_rec.model.signatures["with_history"](
      user_id=tf.constant(users[:5]), history=tf.fill([5, 1], ""),
      exclude=tf.fill([5, 1], ""))
  for i, user in enumerate(users[:5]):
    recs = brute_rec.recommend(user, k=K, exclude_seen=False)
    assert recs.source == recommend.KNOWN_USER
    assert [r["parent_asin"] for r in recs] == [
        x.decode() for x in raw["parent_asin"].numpy()[i]]
    np.testing.assert_allclose([r["score"] for r in recs],
                               raw["scores"].numpy()[i], rtol=1e-5)
    assert [r["rank"] for r in recs] == list(range(1, K + 1))
    first = recs[0]
    book = run.books.set_index("parent_asin").loc[first["parent_asin"]]
    assert first["title"] == json.loads(book["title"])[0]
    assert first["author"] == book["author"]
    assert first["categories"] == json.loads(book["categories"])


def test_exclude_seen(scann_rec, users, seen):
  by_user = seen.groupby("userId")["parent_asin"].apply(set)
  with_seen = 0
  for recs, user in zip(scann_rec.recommend_batch(users, k=K), users):
    assert not by_user[user] & {r["parent_asin"] for r in recs}
    assert len(recs) > 0
  for recs, user in zip(
      scann_rec.recommend_batch(users, k=K, exclude_seen=False), users):
    with_seen += bool(by_user[user] & {r["parent_asin"] for r in recs})
  assert with_seen > 0  # the exclusion has something to do


def test_unknown_user_gets_popularity(scann_rec, run):
  recs = scann_rec.recommend("no-such-user", k=K)
  assert recs.source == recommend.POPULARITY
  assert recs.note.startswith(recommend.POPULARITY)
  items = pd.read_parquet(os.path.join(run.export, "items.parquet"))
  order = np.argsort(-items["train_count"].to_numpy(), kind="stable")[:K]
  assert [r["parent_asin"] for r in recs] == list(
      items["parent_asin"].to_numpy()[order])
  counts = items["train_count"].to_numpy()
  np.testing.assert_allclose([r["score"] for r in recs],
                             counts[order] / counts.sum(), rtol=1e-5)
  assert scann_rec.recommend(None, k=3).source == recommend.POPULARITY


def test_unknown_user_with_history(scann_rec):
  history = ["G1B000", "G1B001", "G1B002", "G1B005"]
  recs = scann_rec.recommend("no-such-user", history + ["nope"], k=K)
  assert recs.source == recommend.HISTORY_BASED
  assert recs.ignored_history == ["nope"]
  assert "nope" in recs.note
  asins = [r["parent_asin"] for r in recs]
  assert not set(asins) & set(history)
  popular = [r["parent_asin"] for r in scann_rec.recommend(None, k=K)]
  assert asins != popular
  unknown_only = scann_rec.recommend(None, ["nope", "nada"], k=K)
  assert unknown_only.source == recommend.POPULARITY
  assert unknown_only.ignored_history == ["nope", "nada"]


def test_history_is_ignored_by_a_model_without_history(scann_rec,
                                                       monkeypatch):
  # What Recommender does with an export of a --history_length=0 run.
  monkeypatch.setattr(scann_rec, "uses_history", False)
  recs = scann_rec.recommend("no-such-user", ["G1B000", "G1B001"], k=K)
  assert recs.source == recommend.POPULARITY
  assert "does not use histories" in recs.note


def test_k_is_capped(scann_rec):
  assert len(scann_rec.recommend(None, k=K)) == K
  for bad in (K + 1, 0, -1, 2.5, True):
    with pytest.raises(ValueError, match="k"):
      scann_rec.recommend(None, k=bad)


def test_training_prints_an_example(run):
  assert "Top 5 for user" in run.printed
  assert "known user" in run.printed
  assert "title" in run.printed and "score" in run.printed


def test_print_example_with_a_prep(run, users, capsys):
  prep = types.SimpleNamespace(
      data=types.SimpleNamespace(users=np.array(users, dtype=object)),
      test=types.SimpleNamespace(users=np.array([2, 1])),
      val=types.SimpleNamespace(users=np.array([], np.int64)))
  recommend.print_example(run.model_dir, prep, 100)  # capped at the export k
  out = capsys.readouterr().out
  assert f"Top {K} for user {users[1]}" in out
  assert out.count("\n") > K


# ------------------------------------------------------------ command line


def test_cli_table(processes, scann_rec, users):
  r = processes("table")
  assert r.code == 0, r.err[-3000:]
  assert "known user" in r.out
  header = [line for line in r.out.splitlines() if "title" in line][0]
  assert "author" in header and "score" in header
  first = scann_rec.recommend(users[0], k=5)[0]
  assert first["title"][:40] in r.out


def test_cli_json(processes, brute_rec, users):
  r = processes("json")
  assert r.code == 0, r.err[-3000:]
  out = json.loads(r.out)
  expected = brute_rec.recommend(users[0], ["G1B000", "nope"], k=5)
  assert out["source"] == recommend.KNOWN_USER
  assert out["ignored_history"] == ["nope"]
  assert [x["parent_asin"] for x in out["results"]] == [
      x["parent_asin"] for x in expected]
  assert set(out["results"][0]) == {"rank", "parent_asin", "title", "author",
                                    "categories", "score"}


def test_cli_bad_model_dir(processes):
  r = processes("bad_dir")
  assert r.code != 0
  assert "Traceback" not in r.err
  lines = [x for x in r.err.strip().splitlines() if x.startswith("error:")]
  assert len(lines) == 1 and "does not exist" in lines[0]
