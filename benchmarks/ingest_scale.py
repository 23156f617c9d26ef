"""Ingest time and peak memory on generated data of a chosen size.

  .venv/bin/python benchmarks/ingest_scale.py --num_events=1000000
  .venv/bin/python benchmarks/ingest_scale.py --num_books=4400000 \
      --num_users=10000000 --num_events=29500000   # the full Amazon size

Generates books/users CSVs with tt_mimic.synth in a temporary directory
(gzipped), then runs the ingest in a child process and prints its wall
time, events per second and peak RSS (the child's ru_maxrss), so the
figures are the ingest's alone, not the generator's.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_NUM_BOOKS = flags.DEFINE_integer("num_books", 0, "0 = num_events / 7.")
_NUM_USERS = flags.DEFINE_integer("num_users", 0, "0 = num_events / 3.")
_NUM_EVENTS = flags.DEFINE_integer("num_events", 1_000_000, "Events.")
_KEEP = flags.DEFINE_string("keep_dir", None, "Write the data here and keep it.")

_CHILD = """
import sys, time, json
import tt_mimic
from tt_mimic.config import IngestConfig
from tt_mimic.data import ingest
cfg = IngestConfig(books_csv=sys.argv[1], users_csv=sys.argv[2],
                          books_limit=0, interactions_limit=0)
start = time.time()
result = ingest.run(cfg)
print(json.dumps({"seconds": time.time() - start,
                  "events_read": result.report["events"]["read"],
                  "events_kept": result.report["events"]["kept"]}))
"""


def main(argv):
  del argv
  events = _NUM_EVENTS.value
  books = _NUM_BOOKS.value or max(events // 7, 100)
  users = _NUM_USERS.value or max(events // 3, 50)
  directory = _KEEP.value or tempfile.mkdtemp(prefix="tt_mimic_scale_")
  start = time.time()
  subprocess.run([sys.executable, "-m", "tt_mimic", "synth",
                  f"--out_dir={directory}", f"--num_books={books}",
                  f"--num_users={users}", f"--num_events={events}", "--gzip"],
                 check=True)
  print(f"generated {events} events in {time.time() - start:.1f}s")
  child = subprocess.run(
      [sys.executable, "-c", _CHILD,
       os.path.join(directory, "books.csv.gz"),
       os.path.join(directory, "users.csv.gz")],
      check=True, capture_output=True, text=True)
  peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
  print(child.stdout.strip().splitlines()[-1])
  print(f"ingest peak RSS (largest child): {peak_gb:.2f} GB")


if __name__ == "__main__":
  app.run(main)
