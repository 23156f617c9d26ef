"""MultiWorkerMirroredStrategy for real: two worker processes on 127.0.0.1.

Each test starts its workers with TF_CONFIG (ports chosen free at test
time), bounds them in time and always kills them at the end.
"""

import contextlib
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import tiny_data

REPO = tiny_data.REPO
PROBE = os.path.join(os.path.dirname(__file__), "equivalence_probe.py")
TIMEOUT = 300


def _free_ports(count: int) -> list[int]:
  sockets = [socket.socket() for _ in range(count)]
  for s in sockets:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


def _env(ports: list[int], index: int) -> dict:
  cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
  return {**os.environ, "TF_CONFIG": json.dumps(
      {"cluster": cluster, "task": {"type": "worker", "index": index}})}


@contextlib.contextmanager
def _cluster(commands: list[list[str]], logs: list[str]):
  """Starts one process per command (worker i gets TF_CONFIG index i);
  kills every one still running on exit."""
  ports = _free_ports(len(commands))
  procs = []
  try:
    for i, (command, log) in enumerate(zip(commands, logs)):
      procs.append(subprocess.Popen(command, cwd=REPO, env=_env(ports, i),
                                    stdout=open(log, "w"),
                                    stderr=subprocess.STDOUT))
    yield procs
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait(timeout=60)


def _wait(procs, logs, timeout=TIMEOUT):
  deadline = time.time() + timeout
  for p in procs:
    p.wait(timeout=max(1, deadline - time.time()))
  for p, log in zip(procs, logs):
    assert p.returncode == 0, open(log).read()[-4000:]


def test_two_workers_equal_one_replica(tmp_path):
  """Loss terms, gradients and one step of 2 workers = 1 replica."""
  outs = [str(tmp_path / f"worker{i}.npz") for i in range(2)]
  logs = [str(tmp_path / f"worker{i}.log") for i in range(2)]
  data = [str(tmp_path / f"data{i}") for i in range(2)]
  for d in data:
    os.makedirs(d)
  commands = [[sys.executable, PROBE, "multi_worker", out, d]
              for out, d in zip(outs, data)]
  with _cluster(commands, logs) as procs:
    _wait(procs, logs)
  from test_distribute import _compare  # pylint: disable=g-import-not-at-top
  for out in outs:
    _compare(out, replicas=2)


def _read(path):
  with open(path) as f:
    return json.load(f)


def test_two_workers_train_resume_export_and_evaluate(tmp_path):
  """A 2-worker run of two variants with early stopping and the refit, one
  worker killed in the second variant and the cluster restarted: every
  worker skips the finished variant and resumes the second from the chief's
  backup and early-stopping state, so all stay in step and finish; only the
  chief wrote the run; its export answers; its metrics equal a
  single-process evaluation."""
  dataset = tiny_data.write_dataset(tmp_path, "small")
  model_dir = str(tmp_path / "run")
  epochs = 3
  values = tiny_data.train_flags(
      dataset, model_dir, distribute="multi_worker",
      variants=["two_tower", "dat"], epochs=epochs, patience=2, refit=True,
      batch_size=64, export=True, export_k=20, recommend_k=3)
  worker_dirs = set(glob.glob(os.path.join(tempfile.gettempdir(),
                                           "tt_mimic_worker_*")))
  command = [sys.executable, "-m", "tt_mimic", "train",
             *tiny_data.as_argv(values)]
  variant = os.path.join(model_dir, "variants", "dat")
  state_path = os.path.join(variant, "early_stopping.json")
  logs = [str(tmp_path / f"first{i}.log") for i in range(2)]
  with _cluster([command, command], logs) as procs:
    deadline = time.time() + TIMEOUT
    validated = []
    while time.time() < deadline and all(p.poll() is None for p in procs):
      if glob.glob(os.path.join(variant, "backup", "chief", "checkpoint")):
        with contextlib.suppress(ValueError, OSError):
          validated = [h["epoch"] for h in _read(state_path)["history"]]
        if validated:
          break
      time.sleep(0.05)
    # A worker dies; the chief cannot go on without it (its collectives
    # fail or hang), so the cluster is restarted, as TensorFlow's
    # multi-worker guide prescribes.
    procs[1].send_signal(signal.SIGKILL)
    procs[0].send_signal(signal.SIGKILL)
    for p in procs:
      p.wait(timeout=60)
  detail = open(logs[0]).read()[-3000:]
  assert validated and max(validated) < epochs, detail
  assert procs[1].returncode == -signal.SIGKILL, detail
  assert not os.path.exists(os.path.join(variant, "result.json"))

  logs = [str(tmp_path / f"second{i}.log") for i in range(2)]
  with _cluster([command, command], logs) as procs:
    _wait(procs, logs)
  chief_log = open(logs[0]).read()
  assert "resuming at epoch" in chief_log, chief_log[-3000:]
  assert "resuming at epoch" in open(logs[1]).read()
  assert "[two_tower] finished earlier" in open(logs[1]).read()
  history = _read(state_path)["history"]
  epochs_run = [h["epoch"] for h in history]
  assert epochs_run == list(range(1, len(epochs_run) + 1)), epochs_run
  assert max(validated) < len(epochs_run) <= epochs
  metrics = _read(os.path.join(model_dir, "metrics.json"))
  assert metrics["dat"]["recall@20"] > 0.0
  assert "dat_refit" in metrics

  # Only the chief wrote into --model_dir: no worker's files, no temporary
  # directories left behind.
  assert not glob.glob(os.path.join(model_dir, "**", "workertemp*"),
                       recursive=True)
  assert set(glob.glob(os.path.join(tempfile.gettempdir(),
                                   "tt_mimic_worker_*"))) <= worker_dirs

  # A single-process evaluation of the chief's weights gives its metrics.
  evaluated = subprocess.run(
      [sys.executable, "-m", "tt_mimic", "evaluate", f"--model_dir={model_dir}",
       "--variant=dat"], cwd=REPO, capture_output=True, text=True,
      timeout=TIMEOUT)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  single = _read(os.path.join(model_dir, "evaluate_dat_test.json"))
  scalars = {k: v for k, v in metrics["dat"].items()
             if isinstance(v, (int, float))}
  assert {"recall@20", "ndcg@20", "mrr"} <= set(scalars)
  for name, value in scalars.items():
    np.testing.assert_allclose(single[name], value, atol=1e-6, err_msg=name)

  # The chief's export loads and answers.
  from tt_mimic.serving import recommender  # pylint: disable=g-import-not-at-top
  rec = recommender.Recommender(model_dir, index="scann")
  answer = rec.recommend(tiny_data.user_id(0), k=5)
  assert len(answer) == 5 and all(r["parent_asin"] for r in answer)
