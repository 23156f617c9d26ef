"""`tt-mimic evaluate`: full-corpus metrics of a finished run's model.

Scores the chosen variant's best weights on a split of the run's own data
(the same users, features and masking as training's evaluation), prints a
table and writes `<model_dir>/evaluate_<variant>_<split>.json`.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging

from tt_mimic.commands import common
from tt_mimic.training import evaluation
from tt_mimic.training import experiment
from tt_mimic.training import pipeline

_EVAL_SPLIT = flags.DEFINE_enum("eval_split", "test", ["val", "test"],
                                "Split to evaluate on.")
_VARIANT = flags.DEFINE_enum(
    "variant", "exported",
    ["exported", "popularity"] + list(pipeline.TRAINED_VARIANTS)
    + [v + pipeline.REFIT_SUFFIX for v in ("popularity", "dat")]
    + [v + pipeline.ENSEMBLE_SUFFIX for v in ("dat", "dat_refit")]
    + [v + pipeline.BLEND_SUFFIX for v in (
        "dat", "dat_refit", "dat" + pipeline.ENSEMBLE_SUFFIX,
        "dat_refit" + pipeline.ENSEMBLE_SUFFIX)],
    "Variant to evaluate (exported: the one the run exports; *_ensemble: "
    "the members of --ensemble together; *_ease: the model blended with "
    "EASE, --ease_weights).")


_KS = flags.DEFINE_list(
    "ks", [str(k) for k in evaluation.KS],
    "Cut-offs: recall, ndcg and hr at each (mrr is over the whole ranking).")


def _cutoffs(values: list[str]) -> tuple[int, ...]:
  try:
    ks = tuple(sorted({int(v) for v in values}))
  except ValueError:
    raise app.UsageError(f"--ks must be positive integers, got "
                         f"{','.join(values)}.") from None
  if not ks or ks[0] < 1:
    raise app.UsageError(f"--ks must be positive integers, got "
                         f"{','.join(values)}.")
  return ks


def evaluate_run(model_dir: str, split: str, variant: str,
                 ks=evaluation.KS) -> tuple[str, dict]:
  """The variant's name and its metrics on `split` at cut-offs `ks`, for
  the run in `model_dir`."""
  config, prep = pipeline.open_run(model_dir)
  if variant == "exported":
    variant = pipeline.exported_variant(model_dir)
  if split == "val" and pipeline.is_refit(variant):
    raise pipeline.RunError(f"{variant} was trained on the validation events; "
                            "evaluate it on test (a score on its own training "
                            "data says nothing).")
  if split == "val" and variant.endswith(pipeline.BLEND_SUFFIX):
    logging.warning("%s's lambda and w were chosen on validation: its "
                    "validation score is optimistic.", variant)
  prep = pipeline.view_for(prep, config.train, variant)
  eval_set = prep.val if split == "val" else prep.test
  if variant.startswith("popularity"):
    scorer = evaluation.popularity_scorer(prep.item_probability)
  else:
    built = pipeline.load_variant(model_dir, config, prep, variant)
    scorer = pipeline.model_scorer(built, len(prep.data.items))
  if split == "test":
    return variant, pipeline.test_metrics(scorer, prep,
                                          config.train.eval_batch_size, ks)
  return variant, evaluation.evaluate(scorer, eval_set, ks=ks,
                                      batch_size=config.train.eval_batch_size)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  model_dir = common.MODEL_DIR.value
  common.note_ignored()
  split, variant = _EVAL_SPLIT.value, _VARIANT.value
  ks = _cutoffs(_KS.value)
  try:
    with pipeline.run_lock(model_dir, create=False):
      variant, metrics = evaluate_run(model_dir, split, variant, ks)
      path = os.path.join(model_dir, f"evaluate_{variant}_{split}.json")
      with open(path, "w") as f:
        json.dump(metrics, f, indent=2)
  except pipeline.RunError as e:
    raise SystemExit(str(e)) from None
  columns = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")] + ["mrr"]
  print(f"{variant} on {split} ({metrics['users']} users, full corpus):\n"
        f"{experiment.table({variant: metrics}, columns)}\nWritten to {path}")


def run(argv=None):
  app.run(main, argv=argv)


if __name__ == "__main__":
  run()
