"""`tt-mimic export`: re-exports a finished run from its directory alone.

The run's `config.json` decides everything but the export settings given
here (--export_k, --max_exclusions, --scann_*), which override it.
"""

from __future__ import annotations

import dataclasses

from absl import app

from tt_mimic.commands import common
from tt_mimic.serving import export
from tt_mimic.training import pipeline

_EXPORT_FLAGS = ("export_k", "max_exclusions", "scann_num_leaves",
                 "scann_leaves_to_search", "scann_reorder", "scann_min_recall")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  model_dir = common.MODEL_DIR.value
  common.note_ignored(keep=_EXPORT_FLAGS)
  try:
    with pipeline.run_lock(model_dir, create=False):
      _export(model_dir)
  except pipeline.RunError as e:
    raise SystemExit(str(e)) from None


def _export(model_dir: str) -> None:
  config, prep = pipeline.open_run(model_dir)
  name = pipeline.exported_variant(model_dir)
  prep = pipeline.view_for(prep, config.train, name)
  built = pipeline.load_variant(model_dir, config, prep, name)
  given = common.run_config().export
  names = common.given(_EXPORT_FLAGS)
  overrides = {f.name: getattr(given, f.name)
               for f in dataclasses.fields(given)
               if (f.metadata.get("flag") or f.name) in names}
  export.export_run(model_dir, prep, built,
                    dataclasses.replace(config.export, **overrides), model=name)


def run(argv=None):
  app.run(main, argv=argv)


if __name__ == "__main__":
  run()
