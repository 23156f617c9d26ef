"""Tests for tt_mimic.serving.catalog (and its command): new books added to
a copy of the served run's export (tests/serving/conftest.py) are
retrievable, usable as history, and reach a running server as a new export
version; interrupted catalogs leave nothing the next one keeps; books of
unseen top-level categories are embedded alike.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
import urllib.request

from absl import app
from absl import flags
from absl.testing import flagsaver
import numpy as np
import pandas as pd
import pytest

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tt_mimic.commands import catalog as catalog_command
from tt_mimic.config import ServeConfig
from tt_mimic.serving import catalog
from tt_mimic.serving import export
from tt_mimic.serving import recommender as recommend
from tt_mimic.serving import server as serve

import tiny_data

K = tiny_data.SERVING_FLAGS["export_k"]

pytestmark = pytest.mark.xdist_group("serving")  # see conftest.py


def _post(url, body):
  request = urllib.request.Request(url + ":predict",
                                   data=json.dumps(body).encode())
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _metadata(url):
  with urllib.request.urlopen(url + "/metadata", timeout=60) as response:
    return json.loads(response.read())


def test_catalog_adds_retrievable_books(run, tmp_path, brute_rec):
  model_dir = str(tmp_path / "run")
  shutil.copytree(run.export, os.path.join(model_dir, "export"))
  csv, new = tiny_data.write_new_books(tmp_path)
  base_dir = os.path.join(model_dir, "export")
  before = pd.read_parquet(os.path.join(base_dir, "items.parquet"))
  # A server on the copy, asked questions all along the catalog's run.
  srv = serve.make_server(model_dir, ServeConfig(
      port=0, index="brute_force", reload_interval=0.2))
  threading.Thread(target=srv.serve_forever, daemon=True).start()
  statuses, stop = [], threading.Event()

  def ask():
    while not stop.is_set():
      statuses.append(_post(srv.url, {"instances": [
          "anybody", {"user_id": None, "history": [new[0], "G1B000"]}]})[0])

  asking = threading.Thread(target=ask)
  asking.start()
  try:
    result = catalog.add_books(model_dir, csv)
    assert result.version == 2
    deadline = time.monotonic() + 120
    while _metadata(srv.url)["model_spec"]["version"] != "2":
      assert time.monotonic() < deadline, "the server did not reload"
      time.sleep(0.1)
    served = len(statuses)
    time.sleep(0.5)
  finally:
    stop.set()
    asking.join()
  assert len(statuses) > served > 0 and set(statuses) == {200}
  meta = _metadata(srv.url)["metadata"]
  assert meta["items"] == len(before) + 4 and meta["counts"]["reloads"] == 1
  status, out = _post(srv.url, {"instances": [
      {"user_id": None, "history": [new[0]]}], "k": 5})
  assert status == 200 and "ignored" not in out["predictions"][0]["note"]
  assert "added by the catalog" in out["predictions"][0]["note"]
  srv.shutdown()
  srv.server_close()
  # The base export is untouched; version 2 is whole in versions/2.
  assert len(pd.read_parquet(os.path.join(base_dir, "items.parquet"))) == len(
      before)
  assert sorted(os.listdir(os.path.join(base_dir, "versions"))) == ["2"]
  with open(os.path.join(base_dir, "CURRENT")) as f:
    assert f.read() == "2\n"
  assert result.books["read"] == 7 and result.books["kept"] == 5
  assert result.books["dropped"] == {"missing_parent_asin": 1,
                                     "duplicate_parent_asin": 1}
  assert result.books["invalid_values"]["price"]["non_numeric"] == 1
  assert result.added == new and result.unchanged == 1
  assert "added 4 new books" in result.summary()
  assert "export version 2" in result.summary()
  export_dir = os.path.join(base_dir, "versions", "2")
  items = pd.read_parquet(os.path.join(export_dir, "items.parquet"))
  embeddings = np.load(os.path.join(export_dir, "embeddings.npy"))
  with open(os.path.join(export_dir, "export.json")) as f:
    info = json.load(f)
  assert len(items) == len(embeddings) == len(before) + 4 == info["items"]
  assert info["base_items"] == len(before) and info["version"] == 2
  assert info["base_export"] == recommend.base_fingerprint(base_dir)
  assert info["scann_agreement_at_k"] >= 0.95
  assert list(items["parent_asin"][-4:]) == new
  assert (items["train_count"][-4:] == 0).all()
  assert np.isfinite(embeddings).all()

  # Rank of each new book for every user, by the exported towers directly.
  query = recommend.load_serving(base_dir, 1).signatures["query"]
  user_ids = list(dict.fromkeys(pd.read_parquet(
      os.path.join(base_dir, "seen.parquet"))["userId"]))
  q = query(user_id=tf.constant(user_ids),
            history=tf.fill([len(user_ids), 1], ""))["embedding"].numpy()
  # TensorFlow Serving's layout: the new version's self-contained model.
  assert sorted(os.listdir(os.path.join(base_dir, "serving"))) == ["1", "2"]
  # A book's score for a user: its best over the user's query vectors.
  scores = (q @ embeddings.T if q.ndim == 2
            else np.einsum("ukd,nd->ukn", q, embeddings).max(axis=1))
  genre_of = {tiny_data.user_id(u): g
              for u, g in enumerate(run.dataset.user_genre)}
  fans = np.array([genre_of[u] == tiny_data.NEW_GENRE for u in user_ids])
  best_ranks = []
  for index in ("scann", "brute_force"):
    rec = recommend.Recommender(model_dir, index=index)
    for j, asin in enumerate(new):
      column = len(before) + j
      rank = (scores > scores[:, column:column + 1]).sum(axis=1)
      best = int(np.argmin(rank))
      if asin != "NEW003":  # science fiction: the model knows the genre,
        # from the metadata alone: fans of the genre rank it higher.
        assert np.median(rank[fans]) < np.median(rank[~fans]), asin
        best_ranks.append(rank[best])
      recs = rec.recommend(user_ids[best], k=K, exclude_seen=False)
      found = [r for r in recs if r["parent_asin"] == asin]
      assert bool(found) == (rank[best] < K), (index, asin, rank[best])
      if found:
        assert found[0]["title"] == rec.book(asin)["title"] != ""
  # Some new science-fiction book reaches a top-K, through both indexes.
  assert min(best_ranks) < K, best_ranks
  # Around the new books, every user's list is the same as before.
  for user in user_ids[:30]:
    now = [r["parent_asin"] for r in rec.recommend(user, k=K)
           if r["parent_asin"] not in new]
    was = [r["parent_asin"] for r in brute_rec.recommend(user, k=K)]
    assert now == was[:len(now)]
  # New books stand in a history as their nearest trained book, and are
  # excluded as read.
  assert rec.version == 2 and rec.version_directory == export_dir
  proxies = items["history_proxy"]
  assert (proxies[:len(before)] == "").all()
  assert set(proxies[len(before):]) <= set(before["parent_asin"])
  nearest = before["parent_asin"][np.argmax(
      embeddings[len(before):] @ embeddings[:len(before)].T, axis=1)]
  assert list(proxies[len(before):]) == list(nearest)
  recs = rec.recommend(None, [new[0], "G1B000"], k=K)
  assert recs.source == recommend.HISTORY_BASED
  assert recs.ignored_history == []
  assert "1 history entry added by the catalog" in recs.note
  assert new[0] not in [r["parent_asin"] for r in recs]
  as_new = rec.recommend(None, [new[0]], k=K, exclude_seen=False)
  as_proxy = rec.recommend(None, [proxies[len(before)]], k=K,
                           exclude_seen=False)
  assert as_new.source == recommend.HISTORY_BASED
  assert [r["parent_asin"] for r in as_new] == [
      r["parent_asin"] for r in as_proxy]

  # The same file again changes nothing; --update_existing re-embeds.
  again = catalog.add_books(model_dir, csv)
  assert again.added == [] and again.unchanged == 5 and not again.index
  changed = os.path.join(str(tmp_path), "changed.csv")
  frame = pd.read_csv(csv, dtype=str, keep_default_na=False).iloc[:1]
  frame["title"] = json.dumps(["The Kitchen of the Sweet, a new edition"])
  frame.to_csv(changed, index=False)
  updated = catalog.add_books(model_dir, changed, update_existing=True)
  assert updated.updated == [new[0]] and updated.added == []
  assert updated.version == 3
  assert sorted(os.listdir(os.path.join(base_dir, "versions"))) == ["2", "3"]
  after = np.load(os.path.join(base_dir, "versions", "3", "embeddings.npy"))
  assert len(after) == len(embeddings)
  assert not np.allclose(after[len(before)], embeddings[len(before)])
  np.testing.assert_allclose(after[:len(before)], embeddings[:len(before)])


class Interrupted(Exception):
  pass


def test_an_interrupted_catalog_leaves_nothing_behind(run, tmp_path,
                                                      monkeypatch):
  model_dir = str(tmp_path / "run")
  base_dir = os.path.join(model_dir, "export")
  shutil.copytree(run.export, base_dir)
  csv, new = tiny_data.write_new_books(tmp_path)
  real = export.build_indexes

  def build_then_die(*args, **kwargs):
    real(*args, **kwargs)  # half the work is on disk, then the process dies
    raise Interrupted()

  monkeypatch.setattr(export, "build_indexes", build_then_die)
  with pytest.raises(Interrupted):
    catalog.add_books(model_dir, csv)
  monkeypatch.setattr(export, "build_indexes", real)
  # Nothing changed for readers: version 1 is still served.
  assert not os.path.exists(os.path.join(base_dir, "CURRENT"))
  assert recommend.current_version(base_dir)[0] == 1
  # What a killed process leaves (no finally ran): a staging directory, a
  # version renamed into place but never named in CURRENT, the staging
  # directory of the catalogs before versions.
  versions = os.path.join(base_dir, "versions")
  for leftover in (os.path.join(versions, ".staging-2", "index_scann"),
                   os.path.join(versions, "2", "index_scann"),
                   os.path.join(base_dir, "serving", "2", "variables"),
                   os.path.join(base_dir, ".catalog_staging", "index_scann")):
    os.makedirs(leftover)
  rec = recommend.Recommender(model_dir, index="brute_force")
  assert rec.version == 1 and len(rec.items) == len(pd.read_parquet(
      os.path.join(base_dir, "items.parquet")))
  # Another catalog holds the lock: this one refuses.
  with open(os.path.join(base_dir, ".catalog.lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    lock.write("process 4242 (tt-mimic catalog)")
    lock.flush()
    with pytest.raises(catalog.CatalogError,
                       match=r"Another tt-mimic catalog \(process 4242 "):
      catalog.add_books(model_dir, csv)
    fcntl.flock(lock, fcntl.LOCK_UN)
  # The next run cleans up and completes.
  result = catalog.add_books(model_dir, csv)
  assert result.version == 2 and result.added == new
  assert os.listdir(versions) == ["2"]
  assert not os.path.exists(os.path.join(base_dir, ".catalog_staging"))
  assert sorted(os.listdir(os.path.join(versions, "2"))) == [
      "embeddings.npy", "export.json", "index_scann", "items.parquet"]
  assert os.path.exists(os.path.join(base_dir, "serving", "2",
                                     "saved_model.pb"))
  assert recommend.Recommender(model_dir, "brute_force").version == 2
  # A version made from an earlier export is ignored (and removed next).
  with open(os.path.join(base_dir, "export.json")) as f:
    info = json.load(f)
  info["exported_at_test"] = "re-exported"
  with open(os.path.join(base_dir, "export.json"), "w") as f:
    json.dump(info, f)
  assert recommend.current_version(base_dir)[0] == 1
  assert catalog.clean_stale(base_dir) == [
      os.path.join(versions, "2"), os.path.join(base_dir, "serving", "2")]


def test_new_top_category_is_embedded_as_unknown(run):
  """Top levels unseen in training are all the same unknown category."""
  candidate = tf.saved_model.load(os.path.join(run.export, "candidate"))
  book = pd.DataFrame({
      "parent_asin": ["P1"], "title": ["Leaves of Grass"],
      "author": ["Walt Whitman"], "categories": [["Books", "Poetry", "Odes"]],
      "average_rating": [4.0], "rating_number": [3.0], "price": [np.nan]})
  a = catalog.embed(candidate, book)
  b = catalog.embed(candidate, book.assign(
      categories=[["Books", "Drama", "Tragedy"]]))
  assert np.isfinite(a).all()
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_catalog_main(run, tmp_path, capsys):
  """The command line: a summary, one-line errors, --books_csv required."""
  known = str(tmp_path / "known.csv")
  run.books.iloc[:3].to_csv(known, index=False)
  with flagsaver.flagsaver(model_dir=run.model_dir, books_csv=known):
    assert catalog_command.main(["catalog"]) == 0
  out = capsys.readouterr().out
  assert "read 3 rows, kept 3" in out and "nothing to change" in out
  for model_dir, books_csv in ((str(tmp_path / "missing"), known),
                               (run.model_dir, str(tmp_path / "none.csv"))):
    with flagsaver.flagsaver(model_dir=model_dir, books_csv=books_csv):
      assert catalog_command.main(["catalog"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
  with flagsaver.flagsaver(model_dir=run.model_dir):
    assert flags.FLAGS["books_csv"].using_default_value
    with pytest.raises(app.UsageError):
      catalog_command.main(["catalog"])
