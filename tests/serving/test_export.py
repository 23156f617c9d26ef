"""Tests for tt_mimic.serving.export: the query and candidate modules
through save and load, and the exported SavedModels and indexes of the
served run (tests/serving/conftest.py), in this process and in a fresh one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from tt_mimic.config import ExportConfig
from tt_mimic.config import FeatureConfig
from tt_mimic.config import LossConfig
from tt_mimic.data import features
from tt_mimic.model import towers
from tt_mimic.serving import export
from tt_mimic.training import pipeline

import tiny_data
from tiny_model import NormMixin
from tiny_model import TOWER
from tiny_model import build
from tiny_model import user_tower

K = tiny_data.SERVING_FLAGS["export_k"]
# The tests of the served run (see conftest.py); ExportRoundTripTest needs
# no run and may go to any worker.
served_run = pytest.mark.xdist_group("serving")


def _query_module(prep, tower):
  """(QueryModule of `tower` on `prep`'s users, seen items, seen splits)."""
  data = prep.data
  seen_items, seen_splits = export.user_seen(data.events, len(data.users))
  query = export.QueryModule(tower, data.users, data.items["parent_asin"],
                             prep.user_id_index, seen_items, seen_splits,
                             prep.feature_config.history_length)
  return query, seen_items, seen_splits


class ExportRoundTripTest(tf.test.TestCase, NormMixin):

  def test_query_and_candidate_modules_survive_save_and_load(self):
    prep, built = build()
    data = prep.data
    seen_items, seen_splits = export.user_seen(data.events, len(data.users))
    query = export.QueryModule(built.user_tower, data.users,
                               data.items["parent_asin"], prep.user_id_index,
                               seen_items, seen_splits,
                               prep.feature_config.history_length)
    candidate = export.CandidateModule(prep.preprocessor, built.item_tower,
                                       prep.item_table["id"])
    users = tf.constant([str(u) for u in data.users[:5]] + ["NEW_USER", ""])
    hist = tf.constant([[data.items["parent_asin"].iloc[3], "", "NOPE"]] * 7)
    books = data.items.iloc[:6]
    raw = features.raw_item_features(books, prep.feature_config)
    # The candidate module agrees with the training-time item encoder.
    direct, _, _ = built.encoder(tf.range(1, 7))
    self.assertAllClose(
        candidate.serving_default(
            **{k: tf.constant(v) for k, v in raw.items()})["embedding"],
        direct, atol=1e-5)
    raw["parent_asin"][-1] = "UNSEEN_BOOK"
    raw["price"][:] = np.nan
    raw_tensors = {k: tf.constant(v) for k, v in raw.items()}

    before_q = query.serving_default(users)
    before_h = query.with_history(users, hist)
    before_c = candidate.serving_default(**raw_tensors)
    self.assertUnitNorm(before_q["embedding"])
    self.assertUnitNorm(before_h["embedding"])
    self.assertUnitNorm(before_c["embedding"])
    self.assertAllEqual(before_q["known"], [True] * 5 + [False] * 2)
    self.assertAllEqual(before_h["known"], [True] * 7)

    directory = self.get_temp_dir()
    for name, module in (("query", query), ("candidate", candidate)):
      export._save(module, os.path.join(directory, name))
    loaded_q = tf.saved_model.load(os.path.join(directory, "query"))
    loaded_c = tf.saved_model.load(os.path.join(directory, "candidate"))
    after_q = loaded_q.serving_default(users)
    after_h = loaded_q.with_history(users, hist)
    after_c = loaded_c.serving_default(**raw_tensors)
    sig = loaded_q.signatures["serving_default"](user_id=users)
    for before, after in ((before_q, after_q), (before_h, after_h),
                          (before_q, sig)):
      self.assertAllClose(before["embedding"], after["embedding"], atol=1e-6)
      self.assertAllEqual(before["known"], after["known"])
    self.assertAllClose(before_c["embedding"], after_c["embedding"], atol=1e-6)
    sig_c = loaded_c.signatures["serving_default"](**raw_tensors)
    self.assertAllClose(before_c["embedding"], sig_c["embedding"], atol=1e-6)

  def test_query_module_with_attention_pools_survives_save_and_load(self):
    prep, built = build()
    data = prep.data
    query, _, _ = _query_module(prep, user_tower(prep, built,
                                                 history_attention=2))
    users = tf.constant([str(u) for u in data.users[:3]] + ["NEW_USER"])
    asins = data.items["parent_asin"]
    hist = tf.constant([[asins.iloc[3], asins.iloc[5], ""]] * 4)
    before = query.with_history(users, hist)["embedding"]
    directory = os.path.join(self.get_temp_dir(), "query_attention")
    export._save(query, directory)
    loaded = tf.saved_model.load(directory)
    self.assertAllClose(loaded.with_history(users, hist)["embedding"], before,
                        atol=1e-6)
    self.assertAllClose(loaded.serving_default(users)["embedding"],
                        query.serving_default(users)["embedding"], atol=1e-6)

  def test_id_residual_towers_survive_save_and_load(self):
    prep, built = build()
    data = prep.data
    tower = user_tower(prep, built, id_residual=True)
    query, _, _ = _query_module(prep, tower)
    items = towers.ItemTower(prep.vocab.sizes(),
                             dataclasses.replace(TOWER, id_residual=True),
                             tower.metadata)
    candidate = export.CandidateModule(prep.preprocessor, items,
                                       prep.item_table["id"])
    users = tf.constant([str(u) for u in data.users[:3]] + ["NEW_USER"])
    asins = data.items["parent_asin"]
    hist = tf.constant([[asins.iloc[3], asins.iloc[5], ""]] * 4)
    raw = {k: tf.constant(v) for k, v in features.raw_item_features(
        data.items.iloc[:5], prep.feature_config).items()}
    before_h = query.with_history(users, hist)["embedding"]
    before_c = candidate.serving_default(**raw)["embedding"]
    directory = self.get_temp_dir()
    for name, module in (("query_res", query), ("candidate_res", candidate)):
      export._save(module, os.path.join(directory, name))
    loaded_q = tf.saved_model.load(os.path.join(directory, "query_res"))
    loaded_c = tf.saved_model.load(os.path.join(directory, "candidate_res"))
    self.assertAllClose(loaded_q.with_history(users, hist)["embedding"],
                        before_h, atol=1e-6)
    self.assertAllClose(loaded_c.serving_default(**raw)["embedding"],
                        before_c, atol=1e-6)
    # The path is part of what was saved: without it the towers differ.
    tower.residual.embeddings.assign(
        tf.zeros_like(tower.residual.embeddings))
    self.assertNotAllClose(query.with_history(users, hist)["embedding"],
                           before_h, atol=1e-3)

  def test_several_interests_serve_each_book_once_at_its_best_score(self):
    # --interests=2: the query is [users, 2, dim]; both indexes rank the
    # corpus by each book's best score over the two vectors, as evaluation
    # does, with the user's read books excluded and no book twice.
    prep, built = build()
    data = prep.data
    query, seen_items, seen_splits = _query_module(
        prep, user_tower(prep, built, interests=2))
    users = np.array([str(u) for u in data.users[:6]])
    vectors = query.serving_default(tf.constant(users))["embedding"].numpy()
    self.assertEqual(vectors.shape[1], 2)
    self.assertGreater(np.abs(vectors[:, 0] - vectors[:, 1]).max(), 1e-3)
    embeddings = pipeline.item_embeddings(built.encoder,
                                          len(data.items))[1:]
    asins = data.items["parent_asin"].to_numpy().astype(str)
    config = ExportConfig(k=5, max_exclusions=20)
    directory = self.get_temp_dir()
    info = export.build_indexes(query, embeddings, asins,
                                np.arange(len(asins), dtype=np.float64),
                                config, directory, vectors)
    self.assertEqual(info["interests"], 2)
    best = np.einsum("ukd,nd->ukn", vectors, embeddings).max(axis=1)
    row = {a: i for i, a in enumerate(asins)}
    serving = tf.saved_model.load(os.path.join(directory,
                                               export.STAGED_SERVING))
    index = tf.saved_model.load(os.path.join(directory, "index_scann"))
    # Users 1..6 are rows 1..6 of the known books (0 is the unknown user).
    known = [asins[seen_items[seen_splits[u]:seen_splits[u + 1]] - 1]
             for u in range(1, len(users) + 1)]
    read = np.array([list(r) + [""] * (max(map(len, known)) - len(r))
                     for r in known])
    answers = {
        "brute force": serving.signatures["serving_default"](
            user_id=tf.constant(users)),
        "scann": index.signatures["serving_default"](
            embedding=tf.constant(vectors),
            known=tf.ones([len(users)], tf.bool),
            exclude=tf.constant(read))}
    for name, answer in answers.items():
      got = answer["parent_asin"].numpy().astype(str)
      for u in range(len(users)):
        self.assertEqual(len(set(got[u])), 5, name)
        self.assertFalse(set(got[u]) & set(known[u]), name)
        expected = [asins[i] for i in np.argsort(-best[u], kind="stable")
                    if asins[i] not in set(known[u])][:5]
        if name == "brute force":
          self.assertAllClose(answer["scores"][u],
                              [best[u][row[a]] for a in got[u]], atol=1e-5)
          self.assertEqual(list(got[u]), expected)
        else:  # approximate: most of the exact top 5
          self.assertGreaterEqual(len(set(got[u]) & set(expected)), 3, name)

  def test_best_per_book_keeps_each_books_best_score(self):
    scores = tf.constant([[0.1, 0.9, 0.5, float("nan"), 0.7, 0.2]])
    books = tf.constant([[3, 1, 3, 2, 1, 4]])
    kept = export.best_per_book(scores, books).numpy()[0]
    self.assertAllClose(kept, [-np.inf, 0.9, 0.5, -np.inf, -np.inf, 0.2])

  def test_query_module_without_history(self):
    # --history_length=0 (the DAT paper's towers): histories are ignored, so
    # an unknown user with one stays unknown (popularity at the index).
    prep, built = build()
    data = prep.data
    query = export.QueryModule(
        built.user_tower, data.users, data.items["parent_asin"],
        prep.user_id_index, *export.user_seen(data.events, len(data.users)),
        history_length=0)
    users = tf.constant([str(data.users[0]), "NEW_USER"])
    hist = tf.constant([[data.items["parent_asin"].iloc[3]]] * 2)
    out = query.with_history(users, hist)
    self.assertUnitNorm(out["embedding"])
    self.assertAllEqual(out["known"], [True, False])
    self.assertAllClose(out["embedding"],
                        query.serving_default(users)["embedding"], atol=1e-6)


# A fresh process loads a candidate tower with --title_standardize=unicode:
# plainly (which must fail: tensorflow-text's ops are not registered), then
# with recommender.load_candidate; it embeds one book under each title given.
_FRESH_CANDIDATE = r"""
import json, sys
import tt_mimic
import tensorflow as tf
from tt_mimic.serving import recommender
directory, raw = sys.argv[1], json.loads(sys.argv[2])
out = {"text_imported_early": "tensorflow_text" in sys.modules}
try:
  tf.saved_model.load(directory + "/candidate")
  out["plain_load"] = "loaded"
except Exception as e:  # pylint: disable=broad-except
  out["plain_load"] = str(e).splitlines()[0]
candidate = recommender.load_candidate(directory)
inputs = {k: tf.constant(v, tf.float32 if k in ("average_rating",
          "rating_number", "price") else tf.string) for k, v in raw.items()}
result = candidate.signatures["serving_default"](**inputs)
out["embedding"] = result["embedding"].numpy().tolist()
print("RESULT " + json.dumps(out))
"""


def _op_types(path: str) -> set[str]:
  """Every op type in a SavedModel's graph and function library."""
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  graph = proto.meta_graphs[0].graph_def
  nodes = list(graph.node) + [n for fn in graph.library.function
                              for n in fn.node_def]
  return {n.op for n in nodes}


def _full_width(title: str) -> str:
  """Upper-case, with ASCII letters, digits and punctuation full-width."""
  return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c
                 for c in title.upper())


def test_unicode_title_export_answers_in_a_fresh_process(tmp_path):
  """A candidate tower with --title_standardize=unicode holds tensorflow-text
  ops (the query tower, which TF Serving serves, none), loads in a fresh
  process through recommender.load_candidate and folds a title's forms
  there as in training."""
  prep = tiny_data.prepared(
      tmp_path, FeatureConfig(title_length=6, history_length=5,
                                       title_standardize="unicode"))
  built = pipeline.build(prep, TOWER, LossConfig())
  pipeline.create_variables(built, prep)
  data = prep.data
  candidate = export.CandidateModule(prep.preprocessor, built.item_tower,
                                     prep.item_table["id"])
  query = export.QueryModule(built.user_tower, data.users,
                             data.items["parent_asin"], prep.user_id_index,
                             *export.user_seen(data.events, len(data.users)),
                             prep.feature_config.history_length)
  title = data.items["title"].iloc[0]  # e.g. "The Dragon of the Sea, part 3"
  titles = [title, _full_width(title),
            "«" + title.upper().replace(", ", "—") + "»", "zzz qqq"]
  raw = features.raw_item_features(data.items.iloc[[0] * len(titles)],
                                   prep.feature_config)
  raw["title"] = np.array(titles)
  expected = candidate.serving_default(
      **{k: tf.constant(v) for k, v in raw.items()})["embedding"].numpy()
  # The forms of the title embed alike; another title does not.
  np.testing.assert_allclose(expected[1:3], expected[[0, 0]], atol=1e-6)
  assert np.abs(expected[3] - expected[0]).max() > 1e-3
  directory = str(tmp_path / "export")
  export._save(candidate, os.path.join(directory, "candidate"))
  export._save(query, os.path.join(directory, "query"))
  assert {"CaseFoldUTF8"} <= _op_types(os.path.join(directory, "candidate"))
  assert not {"CaseFoldUTF8", "NormalizeUTF8"} & _op_types(
      os.path.join(directory, "query"))

  done = subprocess.run(
      [sys.executable, "-c", _FRESH_CANDIDATE, directory,
       json.dumps({k: v.tolist() for k, v in raw.items()})],
      cwd=tiny_data.REPO, capture_output=True, text=True, timeout=240,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), check=False)
  lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
  assert done.returncode == 0 and lines, done.stderr[-3000:]
  out = json.loads(lines[0][len("RESULT "):])
  assert not out["text_imported_early"]
  assert "CaseFoldUTF8" in out["plain_load"]
  np.testing.assert_allclose(out["embedding"], expected, atol=1e-5)


# ------------------------------------------------- the served run's export


def _signature_defs(path):
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  return proto.meta_graphs[0].signature_def


@served_run
def test_named_signatures(run, brute_rec):
  serving_model = brute_rec.model
  serving = serving_model.signatures["serving_default"]
  history = serving_model.signatures["with_history"]
  assert set(serving.structured_input_signature[1]) == {"user_id"}
  assert set(history.structured_input_signature[1]) == {
      "user_id", "history", "exclude"}
  for fn in (serving, history):
    outputs = fn.structured_outputs
    assert set(outputs) == {"parent_asin", "scores"}
    assert outputs["parent_asin"].dtype == tf.string
    assert outputs["scores"].dtype == tf.float32
  defs = _signature_defs(os.path.join(run.export, "serving", "1"))
  for signature in ("serving_default", "with_history"):
    for output in ("parent_asin", "scores"):
      dims = [d.size for d in defs[signature].outputs[output].tensor_shape.dim]
      assert dims == [-1, K], (signature, output)
  assert set(defs["query"].inputs) == {"user_id", "history"}
  assert set(defs["query"].outputs) == {"embedding", "known"}
  index = _signature_defs(os.path.join(run.export, "index_scann"))
  assert set(index["serving_default"].inputs) == {"embedding", "known",
                                                  "exclude"}
  dims = [d.size for d in
          index["serving_default"].outputs["parent_asin"].tensor_shape.dim]
  assert dims == [-1, K]
  candidate = _signature_defs(os.path.join(run.export, "candidate"))
  assert set(candidate["serving_default"].inputs) == {
      "parent_asin", "title", "author", "categories", "average_rating",
      "rating_number", "price"}


@served_run
def test_per_user_state_is_stored_once_as_int32(run, info):
  """Only the serving model holds per-user tables, int32 books with int64
  row splits; the ScaNN index holds none."""
  users = len(pd.read_parquet(os.path.join(run.export, "seen.parquet"))[
      "userId"].unique())

  def variables(path):
    reader = tf.train.load_checkpoint(os.path.join(path, "variables",
                                                   "variables"))
    return {k: (reader.get_variable_to_dtype_map()[k], tuple(shape))
            for k, shape in reader.get_variable_to_shape_map().items()}

  serving = variables(os.path.join(run.export, "serving", "1"))
  # (The user-id embedding and a_u are per-user too: the model's weights.)
  per_user = {k: v for k, v in serving.items() if v[0].is_integer
              and v[1] and v[1][0] in (users + 1, users + 2)}
  assert sorted(v[0].name for v in per_user.values()) == ["int32", "int64"]
  events = len(pd.read_parquet(os.path.join(run.export, "seen.parquet")))
  assert any(v == (tf.int32, (events,)) for v in serving.values())
  index = variables(os.path.join(run.export, "index_scann"))
  assert not any(v[1] and v[1][0] in (users + 1, users + 2, events)
                 for v in index.values())
  assert not os.path.exists(os.path.join(run.export, "query"))
  assert not os.path.exists(os.path.join(run.export, "index_brute_force"))
  assert info["per_user_tables"]["known_events"] == events
  assert set(info["bytes_on_disk"]) >= {"serving", "index_scann"}


@served_run
def test_the_serving_model_alone_answers_as_tt_mimic_serve(run, users,
                                                           brute_rec):
  """TensorFlow Serving's request {"instances": [user_id]} reaches
  serving_default: it must exclude the user's read books inside the model
  and equal tt_mimic's answer."""
  model = tf.saved_model.load(os.path.join(run.export, "serving", "1"))
  out = model.signatures["serving_default"](user_id=tf.constant(users))
  expected = brute_rec.recommend_batch(users, k=K)
  for user, row, want in zip(users, out["parent_asin"].numpy(), expected):
    got = [x.decode() for x in row if x]
    assert got == [r["parent_asin"] for r in want], user
    assert not set(got) & set(brute_rec.seen(user))
  config = open(os.path.join(run.export, "models.config")).read()
  assert f'base_path: "{os.path.join(os.path.abspath(run.export), "serving")}"' in config


@served_run
def test_scann_agrees_with_brute_force(run, info, users, scann_rec,
                                       brute_rec):
  del run
  assert info["k"] == K and info["scann_agreement_at_k"] >= 0.95
  a = brute_rec.recommend_batch(users, k=K, exclude_seen=False)
  b = scann_rec.recommend_batch(users, k=K, exclude_seen=False)
  overlap = [len({r["parent_asin"] for r in x} & {r["parent_asin"] for r in y})
             / K for x, y in zip(a, b)]
  assert np.mean(overlap) >= 0.95


@served_run
def test_fresh_process_loads_every_index(processes, users):
  r = processes("fresh")
  assert r.code == 0, r.err[-3000:]
  line = [x for x in r.out.splitlines() if x.startswith("RESULT ")][-1]
  out = json.loads(line[len("RESULT "):])
  assert not out["scann_loaded_before_import"]
  for name in ("serving", "index_scann"):
    assert out[name]["outputs"] == {"parent_asin": [[4, K], "string"],
                                    "scores": [[4, K], "float32"]}
    assert all(out[name]["first"])
  assert out["serving"]["signatures"] == ["query", "serving_default",
                                          "with_history"]
  assert out["index_scann"]["signatures"] == ["serving_default"]
  assert out["query"]["embedding"] == [4, 8]
  assert out["known"] == [True, True, True, False]


def _clustered(n, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(max(1, n // 50), dim))
  x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.normal(
      size=(n, dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("fixed", [False, True])
def test_scann_searches_more_leaves_until_it_agrees_with_brute_force(fixed):
  from tt_mimic.config import ExportConfig  # pylint: disable=g-import-not-at-top
  import tensorflow_recommenders as tfrs  # pylint: disable=g-import-not-at-top
  data = _clustered(4300)
  vectors, queries = tf.constant(data[:4000]), tf.constant(data[4000:])
  ids = tf.constant(np.arange(4000).astype(str))
  k, retrieve = 50, 60
  brute = tfrs.layers.factorized_top_k.BruteForce(k=retrieve)
  brute.index(vectors, ids)
  config = ExportConfig(k=k, scann_min_recall=0.95,
                        scann_leaves_to_search=1 if fixed else 0)
  params = {"num_leaves": 64, "num_leaves_to_search": 1,
            "num_reordering_candidates": 200}
  _, tuning = export._tuned_scann(  # pylint: disable=protected-access
      vectors, ids, queries, params, k, retrieve, brute, config)
  searched = [t["params"]["num_leaves_to_search"] for t in tuning]
  agreements = [t["agreement_at_k"] for t in tuning]
  if fixed:  # settings given by the user are built once, as given
    assert searched == [1] and agreements[0] < 0.95
    return
  assert searched == [2 ** i for i in range(len(searched))]
  assert len(searched) > 2 and agreements[-1] >= 0.95
  assert all(a < 0.95 for a in agreements[:-1])
