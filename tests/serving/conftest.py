"""The served run and the subprocesses that use it, for tests/serving.

One tiny run is trained and exported once per session: `train_run` runs
`tt_mimic.commands.train.main` in this process on a "serving" tiny_data
dataset (six genres, popularity skew; without dirt, so that its books are
what the export shows) with `tiny_data.SERVING_FLAGS`. Under pytest-xdist
the workers share it: the first to need it trains it under a file lock.
Every test that uses it carries `xdist_group("serving")`, meant to give
them all to one worker under `--dist loadgroup` (with pytest 9.2 and
pytest-xdist 3.8 the mark has no effect: xdist renames `item._nodeid`,
which pytest 9 no longer reads; the lock keeps the run trained once). The
slow fresh-process checks (SavedModel loading, the recommend CLI, the
server's command line) start together in subprocesses right after it
(`processes`) and are checked by separate tests.

Books named by the tests, like "G1B000", are `tiny_data.asin(genre, rank)`:
the most popular books of their genre, in the corpus of every such run.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import subprocess
import sys
import types

from absl import flags
from absl.testing import flagsaver
import pandas as pd
import pytest

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
from tt_mimic.commands import train
from tt_mimic.serving import recommender as recommend

import tiny_data

REPO = tiny_data.REPO

# Loads every exported SavedModel in a process that has never imported
# tt_mimic: brute force without scann, then ScaNN after `import scann`.
_FRESH_LOAD = r"""
import json, sys
import tensorflow as tf
export, users = sys.argv[1], sys.argv[2].split(",")
out = {}
serving = tf.saved_model.load(f"{export}/serving/1")
result = serving.signatures["serving_default"](user_id=tf.constant(users))
out["serving"] = {
    "outputs": {k: [list(v.shape), v.dtype.name] for k, v in result.items()},
    "first": [x.decode() for x in result["parent_asin"].numpy()[0]],
    "signatures": sorted(serving.signatures.keys())}
out["scann_loaded_before_import"] = "scann" in sys.modules
q = serving.signatures["query"](user_id=tf.constant(users),
                                history=tf.fill([len(users), 1], ""))
out["query"] = {k: list(v.shape) for k, v in q.items()}
out["known"] = [bool(x) for x in q["known"].numpy()]
import scann  # noqa
index = tf.saved_model.load(f"{export}/index_scann")
result = index.signatures["serving_default"](
    embedding=q["embedding"], known=q["known"],
    exclude=tf.fill([len(users), 1], ""))
out["index_scann"] = {
    "outputs": {k: [list(v.shape), v.dtype.name] for k, v in result.items()},
    "first": [x.decode() for x in result["parent_asin"].numpy()[0]],
    "signatures": sorted(index.signatures.keys())}
print("RESULT " + json.dumps(out))
"""


def _xdist() -> bool:
  return bool(os.environ.get("PYTEST_XDIST_WORKER"))


def _launch(args, stderr=subprocess.PIPE):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=stderr, text=True)


def train_run(dataset: tiny_data.TinyDataset, model_dir: str) -> str:
  """Trains and exports the DAT run of the serving tests into `model_dir`.

  Returns:
    What training printed to stdout (the example recommendations).
  """
  out = io.StringIO()
  values = tiny_data.train_flags(dataset, model_dir, **tiny_data.SERVING_FLAGS)
  with flagsaver.flagsaver(**values):
    with contextlib.redirect_stdout(out):
      train.main(["train"])
  return out.getvalue()


@pytest.fixture(scope="session")
def run(tmp_path_factory):
  """The trained run: model_dir, export, the books written, training's
  stdout and the directory of both.

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
    dataset = tiny_data.write_dataset(directory, "serving", dirt=False)
    printed_path = directory / "printed.txt"
    if not printed_path.exists():
      printed_path.write_text(train_run(dataset, model_dir))
  return types.SimpleNamespace(
      model_dir=model_dir, export=os.path.join(model_dir, "export"),
      books=dataset.books, dataset=dataset, printed=printed_path.read_text(),
      directory=directory)


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
