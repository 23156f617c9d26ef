"""`tt-mimic ingest`: only the ingest step, with its report of counts."""

from __future__ import annotations

from absl import app

from tt_mimic.commands import common
from tt_mimic.data import ingest
from tt_mimic.training import pipeline


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = common.run_config()
  try:
    with pipeline.run_lock(common.MODEL_DIR.value):
      ingest.run_cached(config.ingest, common.MODEL_DIR.value,
                        common.CACHE_DIR.value)
  except ingest.IngestError as e:
    raise SystemExit(f"ingest failed: {e}") from None
  except pipeline.RunError as e:
    raise SystemExit(str(e)) from None


def run(argv=None):
  app.run(main, argv=argv)


if __name__ == "__main__":
  run()
