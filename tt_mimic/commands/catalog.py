"""`tt-mimic catalog`: adds new books to an exported run without retraining.

  tt-mimic catalog --model_dir=<run> --books_csv=<new books csv> \
      [--update_existing]
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

from tt_mimic.commands import common
from tt_mimic.data import ingest
from tt_mimic.serving import catalog
from tt_mimic.serving import recommender
from tt_mimic.training import pipeline

_UPDATE_EXISTING = flags.DEFINE_bool(
    "update_existing", False, "Also re-embed books already in the export "
    "whose metadata changed.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if flags.FLAGS["books_csv"].using_default_value:
    raise app.UsageError("Give the new books with --books_csv=<file>.")
  common.note_ignored(keep=("books_csv",), decides="The run's export")
  model_dir = common.MODEL_DIR.value
  try:
    # The run's lock too: an export (or a training) rewrites the export
    # directory the catalog builds on.
    directory = recommender.export_directory(model_dir)
    run_dir = (os.path.dirname(directory)
               if os.path.basename(directory) == "export" else directory)
    with pipeline.run_lock(run_dir, create=False):
      result = catalog.add_books(model_dir, flags.FLAGS["books_csv"].value,
                                 _UPDATE_EXISTING.value)
  except (recommender.ExportError, ingest.IngestError,
          catalog.CatalogError, pipeline.RunError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(result.summary())
  return 0


def run(argv=None):
  app.run(main, argv=argv)


if __name__ == "__main__":
  run()
