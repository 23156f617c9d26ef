"""What a user opens after training, on the served run (conftest.py):
TensorBoard, checked through its own HTTP data API, and report.md's plots.

TensorBoard runs as its own process (`tensorboard --logdir ... --port 0`),
once with README's logdir (<model_dir>/tensorboard) and once with
`make tensorboard`'s (the directory holding the runs); both start together,
a few seconds each.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import pytest

import tiny_data

pytestmark = pytest.mark.xdist_group("serving")  # see conftest.py

TENSORBOARD = os.path.join(os.path.dirname(sys.executable), "tensorboard")
PNG = b"\x89PNG\r\n\x1a\n"
EMBEDDING = "embedding/.ATTRIBUTES/VARIABLE_VALUE"


class _TensorBoard:
  """A tensorboard process and GET requests to its HTTP API."""

  def __init__(self, logdir):
    self.process = subprocess.Popen(
        [TENSORBOARD, "--logdir", str(logdir), "--port", "0",
         "--host", "127.0.0.1", "--load_fast=false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    self.url = None

  def wait(self, timeout=60.0):
    # Reading stderr could block forever on a tensorboard that never prints
    # its URL: a timer kills it at the timeout, which ends the stream.
    killer = threading.Timer(timeout, self.process.kill)
    killer.start()
    try:
      for line in self.process.stderr:  # "TensorBoard 2.x at http://...:p/"
        match = re.search(r"(http://[\w.\-]+:\d+/)", line)
        if match:
          self.url = match.group(1)
          break
    finally:
      killer.cancel()
    assert self.url, "tensorboard did not start"
    deadline = time.monotonic() + timeout
    # The first load of the logdir: train, validation and projector runs
    # (the projector's event file holds one scalar) have their scalars.
    while (len(self.get("data/plugin/scalars/tags")) < 3
           and time.monotonic() < deadline):
      time.sleep(0.2)
    return self

  def get(self, path, **params):
    query = "?" + urllib.parse.urlencode(params) if params else ""
    with urllib.request.urlopen(self.url + path + query, timeout=20) as r:
      body = r.read()
    return json.loads(body) if "json" in r.headers["Content-Type"] else body

  def close(self):
    self.process.terminate()
    self.process.communicate(timeout=20)


@pytest.fixture(scope="module")
def boards(run):
  started = {"readme": _TensorBoard(os.path.join(run.model_dir,
                                                 "tensorboard")),
             "make": _TensorBoard(run.directory)}
  try:
    yield {name: board.wait() for name, board in started.items()}
  finally:
    for board in started.values():
      board.close()


@pytest.mark.parametrize("logdir, prefix", [("readme", ""),
                                            ("make", "run/tensorboard/")])
def test_tensorboard_lists_losses_validation_and_projector(boards, logdir,
                                                           prefix):
  board = boards[logdir]
  runs = board.get("data/runs")
  assert {f"{prefix}dat/train", f"{prefix}dat/validation",
          f"{prefix}projector"} <= set(runs)
  tags = board.get("data/plugin/scalars/tags")
  train = tags[f"{prefix}dat/train"]
  for tag in ("epoch_loss", "epoch_loss_main", "epoch_loss_u", "epoch_loss_v",
              "epoch_loss_ca"):
    assert tag in train, sorted(train)
  assert {"validation/recall@20", "validation/ndcg@20"} <= set(
      tags[f"{prefix}dat/validation"])
  epochs = tiny_data.SERVING_FLAGS["epochs"]
  points = board.get("data/plugin/scalars/scalars",
                     run=f"{prefix}dat/validation", tag="validation/recall@20")
  assert [p[1] for p in points] == list(range(epochs))
  points = board.get("data/plugin/scalars/scalars", run=f"{prefix}dat/train",
                     tag="epoch_loss_main")
  assert [p[1] for p in points] == list(range(epochs))

  # The projector finds out whether it is active in a thread of its own.
  deadline = time.monotonic() + 20
  while not board.get("data/plugins_listing")["projector"]["enabled"]:
    assert time.monotonic() < deadline, "the projector stays inactive"
    time.sleep(0.2)
  projector = f"{prefix}projector"
  assert board.get("data/plugin/projector/runs") == [projector]
  info = board.get("data/plugin/projector/info", run=projector)
  (embedding,) = info["embeddings"]
  assert embedding["tensorName"] == EMBEDDING
  assert embedding["metadataPath"] == "metadata.tsv"
  rows, dim = (int(x) for x in embedding["tensorShape"])
  assert dim == 8 and rows > 300
  metadata = board.get("data/plugin/projector/metadata", run=projector,
                       name=EMBEDDING).decode().splitlines()
  assert metadata[0] == "parent_asin\ttitle\tauthor\tcategory"
  assert len(metadata) == rows + 1
  tensor = board.get("data/plugin/projector/tensor", run=projector,
                     name=EMBEDDING)
  assert len(tensor) == rows * dim * 4  # float32


def test_report_shows_the_plots(run):
  with open(os.path.join(run.model_dir, "report.md")) as f:
    text = f.read()
  links = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", text)
  assert sorted(links) == ["plots/loss.png", "plots/test_metrics.png",
                           "plots/validation.png"]
  for link in links:
    with open(os.path.join(run.model_dir, link), "rb") as f:
      assert f.read(8) == PNG
  assert text.index("plots/test_metrics.png") < text.index("## Loss curves")
  assert text.index("## Loss curves") < text.index("plots/loss.png")
