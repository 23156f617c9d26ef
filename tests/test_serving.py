"""Serving an exported run: SavedModels, Recommender, catalog, HTTP, CLI.

One tiny run is trained once per session (serving_fixture; shared by the
workers under pytest-xdist). The slow fresh-process checks (SavedModel
loading, the recommend CLI, the server's command line) start together in
subprocesses right after it and are checked by separate tests. The HTTP
tests run `serve.make_server` in a thread on a free port of 127.0.0.1.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import types

from absl import app
from absl import flags
from absl.testing import flagsaver
import numpy as np
import pandas as pd
import pytest

import serving_fixture
import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from tt_mimic.commands import catalog as catalog_command
from tt_mimic.config import ServeConfig
from tt_mimic.serving import catalog
from tt_mimic.serving import recommender as recommend
from tt_mimic.serving import server as serve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = serving_fixture.TRAIN_FLAGS["export_k"]

# Loads every exported SavedModel in a process that has never imported
# tt_mimic: brute force without scann, then ScaNN after `import scann`.
_FRESH_LOAD = r"""
import json, sys
import tensorflow as tf
export, users = sys.argv[1], sys.argv[2].split(",")
out = {}
def check(name):
  model = tf.saved_model.load(f"{export}/{name}")
  fn = model.signatures["serving_default"]
  result = fn(user_id=tf.constant(users))
  out[name] = {
      "outputs": {k: [list(v.shape), v.dtype.name] for k, v in result.items()},
      "first": [x.decode() for x in result["parent_asin"].numpy()[0]],
      "signatures": sorted(model.signatures.keys())}
check("index_brute_force")
out["scann_loaded_before_import"] = "scann" in sys.modules
import scann  # noqa
check("index_scann")
query = tf.saved_model.load(f"{export}/query")
q = query.signatures["serving_default"](user_id=tf.constant(users))
out["query"] = {k: list(v.shape) for k, v in q.items()}
out["known"] = [bool(x) for x in q["known"].numpy()]
print("RESULT " + json.dumps(out))
"""


pytestmark = pytest.mark.xdist_group("serving")  # one worker under loadgroup


def _xdist() -> bool:
  return bool(os.environ.get("PYTEST_XDIST_WORKER"))


def _launch(args, stderr=subprocess.PIPE):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=stderr, text=True)


@pytest.fixture(scope="session")
def run(tmp_path_factory):
  """The trained run: model_dir, dataset paths and training's stdout.

  Under pytest-xdist the workers of one session share a single run (the
  first trains it under a file lock).
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  if _xdist():
    directory = tmp_path_factory.getbasetemp().parent / "serving_shared"
    directory.mkdir(exist_ok=True)
  else:
    directory = tmp_path_factory.mktemp("serving")
  model_dir = str(directory / "run")
  with open(directory / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    books_csv, users_csv, books = serving_fixture.write_books_dataset(
        str(directory))
    printed_path = directory / "printed.txt"
    if not printed_path.exists():
      printed_path.write_text(
          serving_fixture.train_run(model_dir, books_csv, users_csv))
  return types.SimpleNamespace(
      model_dir=model_dir, export=os.path.join(model_dir, "export"),
      books=books, printed=printed_path.read_text(), directory=directory)


@pytest.fixture(scope="session")
def seen(run):
  return pd.read_parquet(os.path.join(run.export, "seen.parquet"))


@pytest.fixture(scope="session")
def users(seen):
  return list(dict.fromkeys(seen["userId"]))


@pytest.fixture(scope="session")
def processes(run, users, tmp_path_factory):
  """Fresh-process loading, the CLI and the server in subprocesses.

  They all start at once, so that they overlap with the in-process tests
  (under pytest-xdist each starts when first needed instead); `result(name)`
  waits for one. The server is returned running.
  """
  py = sys.executable
  cli = [py, "-m", "tt_mimic", "recommend", f"--model_dir={run.model_dir}",
         f"--user_id={users[0]}", "--k=5"]
  commands = {
      "serve": [py, "-m", "tt_mimic", "serve", f"--model_dir={run.model_dir}",
                "--port=0", "--index=brute_force"],
      "fresh": [py, "-c", _FRESH_LOAD, run.export,
                ",".join(users[:3] + ["no-such-user"])],
      "table": cli + ["--format=table"],
      "json": cli + ["--format=json", "--index=brute_force",
                     "--history=G1B000,nope"],
      "bad_dir": [py, "-m", "tt_mimic", "recommend",
                  f"--model_dir={run.directory / 'missing'}", "--user_id=x"],
  }
  server_log = open(tmp_path_factory.mktemp("serve") / "stderr.txt", "w+")
  started, done = {}, {}

  def start(name):
    if name not in started:
      started[name] = _launch(commands[name],
                              server_log if name == "serve" else
                              subprocess.PIPE)
    return started[name]

  def result(name):
    if name == "serve":
      return start(name), server_log
    if name not in done:
      out, err = start(name).communicate(timeout=240)
      done[name] = types.SimpleNamespace(code=started[name].returncode,
                                         out=out, err=err)
    return done[name]

  if not _xdist():
    for name in commands:
      start(name)
  yield result
  for p in started.values():
    if p.poll() is None:
      p.kill()
      p.communicate()
  server_log.close()


@pytest.fixture(scope="session")
def scann_rec(run, processes):
  del processes  # started first, so they overlap with the in-process tests
  return recommend.Recommender(run.model_dir, index="scann")


@pytest.fixture(scope="session")
def brute_rec(run, processes):
  del processes
  return recommend.Recommender(run.model_dir, index="brute_force")


@pytest.fixture(scope="session")
def info(run):
  with open(os.path.join(run.export, "export.json")) as f:
    return json.load(f)


# ------------------------------------------------------------ SavedModels


def _signature_defs(path):
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(path, "saved_model.pb"), "rb") as f:
    proto.ParseFromString(f.read())
  return proto.meta_graphs[0].signature_def


def test_named_signatures(run, brute_rec):
  index = brute_rec.model
  serving = index.signatures["serving_default"]
  history = index.signatures["with_history"]
  assert set(serving.structured_input_signature[1]) == {"user_id"}
  assert set(history.structured_input_signature[1]) == {
      "user_id", "history", "exclude"}
  for fn in (serving, history):
    outputs = fn.structured_outputs
    assert set(outputs) == {"parent_asin", "scores"}
    assert outputs["parent_asin"].dtype == tf.string
    assert outputs["scores"].dtype == tf.float32
  for name in ("index_brute_force", "index_scann"):
    defs = _signature_defs(os.path.join(run.export, name))
    for signature in ("serving_default", "with_history"):
      for output in ("parent_asin", "scores"):
        dims = [d.size for d in
                defs[signature].outputs[output].tensor_shape.dim]
        assert dims == [-1, K], (name, signature, output)
  query = _signature_defs(os.path.join(run.export, "query"))
  assert set(query["with_history"].inputs) == {"user_id", "history"}
  assert set(query["serving_default"].outputs) == {"embedding", "known"}
  candidate = _signature_defs(os.path.join(run.export, "candidate"))
  assert set(candidate["serving_default"].inputs) == {
      "parent_asin", "title", "author", "categories", "average_rating",
      "rating_number", "price"}


def test_scann_agrees_with_brute_force(run, info, users, scann_rec,
                                       brute_rec):
  del run
  assert info["k"] == K and info["scann_agreement_at_k"] >= 0.95
  a = brute_rec.recommend_batch(users, k=K, exclude_seen=False)
  b = scann_rec.recommend_batch(users, k=K, exclude_seen=False)
  overlap = [len({r["parent_asin"] for r in x} & {r["parent_asin"] for r in y})
             / K for x, y in zip(a, b)]
  assert np.mean(overlap) >= 0.95


# ------------------------------------------------------------ Recommender


def test_known_user_matches_the_index(run, brute_rec, users):
  raw = brute_rec.model.signatures["serving_default"](
      user_id=tf.constant(users[:5]))
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


# ------------------------------------------------------------ catalog


def test_catalog_adds_retrievable_books(run, tmp_path, brute_rec):
  model_dir = str(tmp_path / "run")
  shutil.copytree(run.export, os.path.join(model_dir, "export"))
  csv, new = serving_fixture.write_new_books(str(tmp_path))
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
  for index in ("scann", "brute_force"):
    rec = recommend.Recommender(model_dir, index=index)
    for j, asin in enumerate(new):
      column = len(before) + j
      rank = (scores > scores[:, column:column + 1]).sum(axis=1)
      best = int(np.argmin(rank))
      if asin != "NEW003":  # science fiction: the model knows the genre
        assert rank[best] < K, f"{asin} is never in a top-{K}"
      recs = rec.recommend(user_ids[best], k=K, exclude_seen=False)
      found = [r for r in recs if r["parent_asin"] == asin]
      assert bool(found) == (rank[best] < K), (index, asin, rank[best])
      if found:
        assert found[0]["title"] == rec.book(asin)["title"] != ""
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


# ------------------------------------------------------------ HTTP server


@pytest.fixture(scope="session")
def server(scann_rec):
  srv = serve.make_server("", ServeConfig(port=0), recommender=scann_rec)
  thread = threading.Thread(target=srv.serve_forever, daemon=True)
  thread.start()
  yield srv
  srv.shutdown()
  srv.server_close()


def _call(srv, method, path, body=None, headers=None, timeout=60):
  """(status, decoded JSON) of one request."""
  conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1],
                                    timeout=timeout)
  try:
    if isinstance(body, (dict, list)):
      body = json.dumps(body)
    if isinstance(body, str):
      body = body.encode()
    if headers is None:
      conn.request(method, path, body=body,
                   headers={"Content-Type": "application/json"})
    else:
      conn.putrequest(method, path)
      for name, value in headers.items():
        conn.putheader(name, value)
      conn.endheaders()
      if body:
        conn.send(body)
    response = conn.getresponse()
    data = response.read()
    assert response.getheader("Content-Type") == "application/json"
    return response.status, json.loads(data)
  finally:
    conn.close()


PREDICT = "/v1/models/tt_mimic:predict"


def test_status_and_metadata(server):
  assert _call(server, "GET", "/v1/models/tt_mimic") == (200, {
      "model_version_status": [{"version": "1", "state": "AVAILABLE",
                                "status": {"error_code": "OK",
                                           "error_message": ""}}]})
  assert _call(server, "GET", "/v1/models/tt_mimic/versions/1")[0] == 200
  status, meta = _call(server, "GET", "/v1/models/tt_mimic/metadata")
  assert status == 200 and meta["metadata"]["k"]["max"] == K


def _expected(rec, user, history=None, k=10, exclude_seen=True):
  recs = rec.recommend(user, history, k=k, exclude_seen=exclude_seen)
  return [r["parent_asin"] for r in recs], [r["score"] for r in recs]


def test_predict_instances(server, scann_rec, users):
  status, out = _call(server, "POST", PREDICT, {"instances": [
      users[0], {"user_id": users[1]},
      {"user_id": "nobody", "history": ["G2B000", "G2B003"]},
      {"user_id": None}], "k": 7})
  assert status == 200 and len(out["predictions"]) == 4
  cases = [(users[0], None), (users[1], None),
           ("nobody", ["G2B000", "G2B003"]), (None, None)]
  for got, (user, history) in zip(out["predictions"], cases):
    asins, scores = _expected(scann_rec, user, history, k=7)
    assert got["parent_asin"] == asins
    np.testing.assert_allclose(got["scores"], scores, rtol=1e-6)
    assert len(got["title"]) == len(got["author"]) == len(asins)
  sources = [p["source"] for p in out["predictions"]]
  assert sources == [recommend.KNOWN_USER, recommend.KNOWN_USER,
                     recommend.HISTORY_BASED, recommend.POPULARITY]
  status, out = _call(server, "POST", "/v1/models/tt_mimic/versions/1:predict",
                      {"instances": [users[2]], "exclude_seen": False})
  assert status == 200
  assert out["predictions"][0]["parent_asin"] == _expected(
      scann_rec, users[2], exclude_seen=False)[0]


def test_predict_inputs(server, scann_rec, users):
  status, out = _call(server, "POST", PREDICT, {"inputs": {
      "user_id": [users[3], "nobody"], "history": [[], ["G4B001"]]},
      "k": 5})
  assert status == 200
  outputs = out["outputs"]
  assert outputs["parent_asin"] == [
      _expected(scann_rec, users[3], k=5)[0],
      _expected(scann_rec, "nobody", ["G4B001"], k=5)[0]]
  assert np.array(outputs["scores"]).shape == (2, 5)
  assert outputs["source"] == [recommend.KNOWN_USER, recommend.HISTORY_BASED]
  status, out = _call(server, "POST", PREDICT,
                      {"inputs": {"user_id": [users[3]]}})
  assert status == 200 and len(out["outputs"]["parent_asin"][0]) == 10


_BAD_REQUESTS = {
    "malformed_json": (b'{"instances": [', 400),
    "not_utf8": (b'\xff\xfe{', 400),
    "not_an_object": ([1, 2], 400),
    "neither": ({"k": 3}, 400),
    "both": ({"instances": ["a"], "inputs": {"user_id": ["a"]}}, 400),
    "unknown_top_field": ({"instances": ["a"], "kk": 3}, 400),
    "instances_not_list": ({"instances": "a"}, 400),
    "instances_empty": ({"instances": []}, 400),
    "instance_number": ({"instances": [5]}, 400),
    "user_id_number": ({"instances": [{"user_id": 5}]}, 400),
    "missing_user_id": ({"instances": [{"history": ["G1B000"]}]}, 400),
    "unknown_instance_field": ({"instances": [{"user_id": "a", "x": 1}]},
                               400),
    "history_not_list": ({"instances": [{"user_id": "a", "history": "b"}]},
                         400),
    "history_numbers": ({"instances": [{"user_id": "a", "history": [1]}]},
                        400),
    "k_string": ({"instances": ["a"], "k": "5"}, 400),
    "k_bool": ({"instances": ["a"], "k": True}, 400),
    "k_too_large": ({"instances": ["a"], "k": K + 1}, 400),
    "k_zero": ({"instances": ["a"], "k": 0}, 400),
    "exclude_seen_string": ({"instances": ["a"], "exclude_seen": "no"}, 400),
    "inputs_not_object": ({"inputs": ["a"]}, 400),
    "inputs_missing_user_id": ({"inputs": {"history": [[]]}}, 400),
    "inputs_user_id_not_list": ({"inputs": {"user_id": "a"}}, 400),
    "inputs_history_length": ({"inputs": {"user_id": ["a", "b"],
                                          "history": [[]]}}, 400),
    "too_many_instances": ({"instances": ["u"] * 257}, 400),
    "too_many_inputs": ({"inputs": {"user_id": ["u"] * 257}}, 400),
    "history_too_long": ({"instances": [{"user_id": "a",
                                         "history": ["b"] * 1001}]}, 400),
    "body_too_long": (b'{"instances": ["' + b"x" * (1 << 20) + b'"]}', 413),
}


@pytest.mark.parametrize("name", sorted(_BAD_REQUESTS))
def test_bad_requests_get_4xx_json(server, name):
  body, expected = _BAD_REQUESTS[name]
  status, out = _call(server, "POST", PREDICT, body)
  assert status == expected, out
  assert set(out) == {"error"} and out["error"]
  assert _call(server, "GET", "/v1/models/tt_mimic")[0] == 200


def test_bad_paths_and_methods(server):
  for method, path, expected in (
      ("GET", "/", 404), ("GET", "/v1/models/other", 404),
      ("POST", "/v1/models/other:predict", 404),
      ("POST", "/v1/models/tt_mimic:classify", 404),
      ("GET", PREDICT, 405), ("POST", "/v1/models/tt_mimic", 405),
      ("PUT", PREDICT, 405), ("DELETE", "/v1/models/tt_mimic", 405),
      ("OPTIONS", PREDICT, 501)):
    status, out = _call(server, method, path, {"instances": ["a"]})
    assert status == expected and "error" in out, (method, path)
  status, out = _call(server, "POST", PREDICT, None,
                      headers={"Content-Type": "application/json"})
  assert status == 411 and "Content-Length" in out["error"]
  status, out = _call(server, "POST", PREDICT, None,
                      headers={"Content-Length": "abc"})
  assert status == 400 and "error" in out
  with socket.create_connection(("127.0.0.1", server.server_address[1]),
                                timeout=30) as raw:
    raw.sendall(b"GET / NOT HTTP/1.1\r\n\r\n")
    answer = raw.makefile("rb").read()
  head, _, data = answer.partition(b"\r\n\r\n")
  assert head.split()[1] == b"400" and "error" in json.loads(data)
  ok, _ = _call(server, "POST", PREDICT, {"instances": ["a"]})
  assert ok == 200
  assert server.counts()["errors"] > 0


def test_concurrent_clients(server, scann_rec, users):
  rng = np.random.default_rng(0)
  plans = []
  for t in range(8):
    thread_plans = []
    for i in range(5):
      picked = [str(u) for u in rng.choice(users, size=1 + (t + i) % 4,
                                           replace=False)]
      rows = [u if j % 2 else {"user_id": u, "history": (
          ["G3B000", "G3B002"] if j == 2 else [])}
              for j, u in enumerate(picked)] + ["anonymous"]
      thread_plans.append((rows, 3 + (t + i) % 8))
    plans.append(thread_plans)

  def client(thread_plans):
    answers = []
    for rows, k in thread_plans:
      answers.append(_call(server, "POST", PREDICT,
                           {"instances": rows, "k": k}))
    return answers

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    results = list(pool.map(client, plans))
  for thread_plans, answers in zip(plans, results):
    for (rows, k), (status, out) in zip(thread_plans, answers):
      assert status == 200, out
      for row, got in zip(rows, out["predictions"]):
        user = row if isinstance(row, str) else row["user_id"]
        history = None if isinstance(row, str) else row["history"]
        asins, scores = _expected(scann_rec, user, history, k=k)
        assert got["parent_asin"] == asins
        np.testing.assert_allclose(got["scores"], scores, rtol=1e-6)


# ------------------------------------------------------------ subprocesses


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


def test_fresh_process_loads_every_index(processes, users):
  r = processes("fresh")
  assert r.code == 0, r.err[-3000:]
  line = [x for x in r.out.splitlines() if x.startswith("RESULT ")][-1]
  out = json.loads(line[len("RESULT "):])
  assert not out["scann_loaded_before_import"]
  for name in ("index_brute_force", "index_scann"):
    assert out[name]["outputs"] == {"parent_asin": [[4, K], "string"],
                                    "scores": [[4, K], "float32"]}
    assert out[name]["signatures"] == ["serving_default", "with_history"]
    assert all(out[name]["first"])
  assert out["query"]["embedding"] == [4, 8]
  assert out["known"] == [True, True, True, False]




def test_serve_cli(processes, users):
  p, log = processes("serve")
  line = p.stdout.readline()  # printed once the model is loaded
  log.seek(0)
  assert line.startswith("Serving "), (line, log.read()[-3000:])
  url = line.split(" at ")[1].strip()
  conn = http.client.HTTPConnection(url.split("/")[2], timeout=60)
  conn.request("POST", "/v1/models/tt_mimic:predict",
               body=json.dumps({"instances": [users[0]], "k": 3}))
  response = conn.getresponse()
  out = json.loads(response.read())
  conn.close()
  assert response.status == 200
  assert len(out["predictions"][0]["parent_asin"]) == 3
  p.send_signal(signal.SIGINT)
  p.communicate(timeout=300)  # generous: the machine may be loaded
  assert p.returncode == 0
