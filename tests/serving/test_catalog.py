"""Tests for tt_mimic.serving.catalog (and its command): new books added to
a copy of the served run's export (tests/serving/conftest.py) are
retrievable, and books of unseen top-level categories are embedded alike.
"""

from __future__ import annotations

import json
import os
import shutil

from absl import app
from absl import flags
from absl.testing import flagsaver
import numpy as np
import pandas as pd
import pytest

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tt_mimic.commands import catalog as catalog_command
from tt_mimic.serving import catalog
from tt_mimic.serving import recommender as recommend

import tiny_data

K = tiny_data.SERVING_FLAGS["export_k"]

pytestmark = pytest.mark.xdist_group("serving")  # see conftest.py


def test_catalog_adds_retrievable_books(run, tmp_path, brute_rec):
  model_dir = str(tmp_path / "run")
  shutil.copytree(run.export, os.path.join(model_dir, "export"))
  csv, new = tiny_data.write_new_books(tmp_path)
  before = pd.read_parquet(os.path.join(model_dir, "export", "items.parquet"))
  result = catalog.add_books(model_dir, csv)
  assert result.books["read"] == 7 and result.books["kept"] == 5
  assert result.books["dropped"] == {"missing_parent_asin": 1,
                                     "duplicate_parent_asin": 1}
  assert result.books["invalid_values"]["price"]["non_numeric"] == 1
  assert result.added == new and result.unchanged == 1
  assert "added 4 new books" in result.summary()
  export_dir = os.path.join(model_dir, "export")
  items = pd.read_parquet(os.path.join(export_dir, "items.parquet"))
  embeddings = np.load(os.path.join(export_dir, "embeddings.npy"))
  with open(os.path.join(export_dir, "export.json")) as f:
    info = json.load(f)
  assert len(items) == len(embeddings) == len(before) + 4 == info["items"]
  assert info["base_items"] == len(before)
  assert info["scann_agreement_at_k"] >= 0.95
  assert list(items["parent_asin"][-4:]) == new
  assert (items["train_count"][-4:] == 0).all()
  assert np.isfinite(embeddings).all()

  # Rank of each new book for every user, by the exported towers directly.
  query = tf.saved_model.load(os.path.join(export_dir, "query"))
  user_ids = list(dict.fromkeys(pd.read_parquet(
      os.path.join(export_dir, "seen.parquet"))["userId"]))
  q = query.signatures["serving_default"](
      user_id=tf.constant(user_ids))["embedding"].numpy()
  scores = q @ embeddings.T
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
  # New books cannot describe a history yet, but they are excluded as read.
  recs = rec.recommend(None, [new[0], "G1B000"], k=K)
  assert recs.source == recommend.HISTORY_BASED
  assert recs.ignored_history == [new[0]]
  assert new[0] not in [r["parent_asin"] for r in recs]

  # The same file again changes nothing; --update_existing re-embeds.
  again = catalog.add_books(model_dir, csv)
  assert again.added == [] and again.unchanged == 5 and not again.index
  changed = os.path.join(str(tmp_path), "changed.csv")
  frame = pd.read_csv(csv, dtype=str, keep_default_na=False).iloc[:1]
  frame["title"] = json.dumps(["The Kitchen of the Sweet, a new edition"])
  frame.to_csv(changed, index=False)
  updated = catalog.add_books(model_dir, changed, update_existing=True)
  assert updated.updated == [new[0]] and updated.added == []
  after = np.load(os.path.join(export_dir, "embeddings.npy"))
  assert len(after) == len(embeddings)
  assert not np.allclose(after[len(before)], embeddings[len(before)])
  np.testing.assert_allclose(after[:len(before)], embeddings[:len(before)])


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
