"""`tt-mimic train`: ingest, train the compared variants, report, export.

Reads the flags, runs ingest (cached), trains the compared variants with
full-corpus validation and early stopping, writes `metrics.json`,
`report.md`, the resolved `flags.cfg` and `config.json` to `--model_dir`,
exports the DAT model and prints one user's recommendations.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

from absl import app

from tt_mimic.commands import common
from tt_mimic.data import ingest
from tt_mimic.serving import export
from tt_mimic.serving import recommender
from tt_mimic.training import experiment
from tt_mimic.training import pipeline
from tt_mimic.training import report
from tt_mimic.training import trainer


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = common.run_config()
  model_dir = common.MODEL_DIR.value
  # Before any other TensorFlow op: MultiWorkerMirroredStrategy configures
  # the process's collective ops at creation.
  strategy = trainer.strategy(config.train.distribute)
  try:
    if trainer.is_chief(strategy):
      with pipeline.run_lock(model_dir):
        _train(config, model_dir)
    else:
      # A non-chief worker trains in step with the chief but writes only to
      # a private directory, removed at the end (TensorFlow's multi-worker
      # rule), and restores from the chief's backups in --model_dir. The
      # directory's name is fixed per run and task, so a restarted worker
      # removes what a killed one left.
      private = _worker_dir(model_dir, strategy)
      shutil.rmtree(private, ignore_errors=True)
      try:
        _train(config, private, chief_dir=model_dir)
      finally:
        shutil.rmtree(private, ignore_errors=True)
  except pipeline.RunError as e:
    raise SystemExit(str(e)) from None


def _worker_dir(model_dir: str, strategy) -> str:
  """A non-chief worker's private directory for the run in `model_dir`."""
  resolver = strategy.cluster_resolver
  key = hashlib.sha256(os.path.abspath(model_dir).encode()).hexdigest()[:12]
  return os.path.join(tempfile.gettempdir(), f"tt_mimic_worker_{key}_"
                      f"{resolver.task_type}{resolver.task_id}")


def _train(config, model_dir: str, chief_dir: str | None = None) -> None:
  """The run in `model_dir`; with `chief_dir`, a non-chief worker's part
  (training and evaluation only: no report, export or example)."""
  common.write_flags(model_dir)
  try:
    prep = pipeline.start_run(config, model_dir,
                              None if chief_dir else common.CACHE_DIR.value)
  except ingest.IngestError as e:
    raise SystemExit(f"ingest failed: {e}") from None
  variants = tuple(v for v in experiment.VARIANTS
                   if v in config.train.variants)
  try:
    metrics, results, built = experiment.run(
        prep, config.tower, config.loss, config.train, variants, model_dir,
        chief_dir)
  except trainer.NonFiniteLossError as e:
    raise SystemExit(str(e)) from None
  if chief_dir:
    return
  report.write(model_dir, prep, metrics, results, built)
  if config.export.export and "dat" in built:
    name = pipeline.exported_variant(model_dir)
    view = pipeline.view_for(prep, config.train, name)
    export.export_run(model_dir, view, built[name], config.export, model=name)
    if config.export.recommend_k:
      recommender.print_example(model_dir, view, config.export.recommend_k)


def run(argv=None):
  app.run(main, argv=argv)


if __name__ == "__main__":
  run()
