"""Runs the compared variants on one split and collects their metrics.

Variants (same data, split, budget and tower sizes):
  popularity  training counts, no model
  two_tower   the towers with neither AMM nor CAL
  dat_no_cal  AMM only
  dat         AMM and CAL (the model that is exported)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from absl import logging
import numpy as np

from tt_mimic.config import LossConfig
from tt_mimic.config import TowerConfig
from tt_mimic.config import TrainConfig
from tt_mimic.config import VARIANTS  # noqa: F401  (re-exported)
from tt_mimic.model import ease as ease_lib
from tt_mimic.training import blend as blend_lib
from tt_mimic.training import evaluation
from tt_mimic.training import pipeline
from tt_mimic.training import trainer
HEADLINE = ("recall@20", "ndcg@20", "hr@20", "recall@50", "recall@100",
            "ndcg@100", "mrr")


def run(prep: pipeline.Prepared, tower: TowerConfig,
        loss: LossConfig, train: TrainConfig,
        variants: tuple[str, ...], model_dir: str,
        chief_dir: str | None = None):
  """Trains/evaluates `variants`; returns (metrics, results, built models).

  `chief_dir`: for a non-chief worker of a cluster, which trains in a
  private `model_dir`, the chief's run directory: its variants' backups and
  state are where every worker resumes from (see trainer.train_variant).

  With `train.refit`, dat is also retrained on training plus validation
  events ("dat_refit", with "popularity_refit" beside it). With
  `train.ensemble` = N > 1, the exported one of the two is trained N - 1
  more times with other seeds ("dat_refit_2", ...) and their ensemble is
  evaluated ("dat_refit_ensemble"). With `train.ease_weights`, the exported
  model blended with EASE (training.blend) is evaluated as well
  ("<exported>_ease") when validation prefers it to the towers alone.

  metrics: {variant: {metric: value}} on the test split.
  results: {variant: result dict with history} for trained variants.
  built: {variant: pipeline.Built} for trained variants.
  """
  metrics, results, built = {}, {}, {}
  if chief_dir is None:
    _remove_blends(model_dir)
  for name in variants:
    if name == "popularity":
      metrics[name] = pipeline.test_metrics(
          evaluation.popularity_scorer(prep.item_probability), prep,
          train.eval_batch_size)
      continue
    tower_cfg, loss_cfg = pipeline.variant_configs(name, tower, loss)
    built[name], results[name] = trainer.train_variant(
        name, prep, tower_cfg, loss_cfg, train,
        os.path.join(model_dir, "variants", name),
        os.path.join(model_dir, "tensorboard", name),
        shared_dir=_shared(chief_dir, name))
    metrics[name] = results[name]["test"]
  if train.refit and "dat" in results:
    _refit(prep, tower, loss, train, model_dir, metrics, results, built,
           chief_dir)
  if train.ensemble > 1 and "dat" in results:
    _ensemble(prep, tower, loss, train, model_dir, metrics, results, built,
              chief_dir)
  if train.ease_weights and "dat" in results and chief_dir is None:
    # Fitted by the chief alone (a worker's directory is deleted).
    _blend(prep, train, model_dir, metrics, built)
  with open(os.path.join(model_dir, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2)
  logging.info("Test metrics (full corpus, %d users, split %s)\n%s",
               prep.test.users.size, prep.data.report["config"]["split"],
               table(metrics))
  return metrics, results, built


def _shared(chief_dir: str | None, name: str) -> str | None:
  return chief_dir and os.path.join(chief_dir, "variants", name)


def _refit(prep, tower, loss, train, model_dir, metrics, results, built,
           chief_dir):
  """dat retrained on training plus validation events for the epochs that
  validation chose: the model a user deploys (and exports). Popularity
  gets the same events, so the two compare under one protocol."""
  view = pipeline.refit_view(prep, train)
  name = "dat" + pipeline.REFIT_SUFFIX
  metrics["popularity" + pipeline.REFIT_SUFFIX] = pipeline.test_metrics(
      evaluation.popularity_scorer(view.item_probability), view,
      train.eval_batch_size)
  tower_cfg, loss_cfg = pipeline.variant_configs("dat", tower, loss)
  built[name], results[name] = trainer.train_variant(
      name, view, tower_cfg, loss_cfg, train,
      os.path.join(model_dir, "variants", name),
      os.path.join(model_dir, "tensorboard", name),
      refit_epochs=results["dat"]["best_epoch"],
      shared_dir=_shared(chief_dir, name))
  metrics[name] = results[name]["test"]


def _ensemble(prep, tower, loss, train, model_dir, metrics, results, built,
              chief_dir):
  """The exported variant (dat_refit, or dat without a refit) trained
  `train.ensemble` - 1 more times, with the seeds of `member_seed`, for the
  epochs validation chose, on the same events; their ensemble
  (model.ensemble) is the model exported."""
  stem = pipeline.exported_stem(train)
  view = pipeline.view_for(prep, train, stem)
  tower_cfg, loss_cfg = pipeline.variant_configs("dat", tower, loss)
  members = [built[stem]]
  for i in range(2, train.ensemble + 1):
    name = pipeline.member_name(stem, i)
    built[name], results[name] = trainer.train_variant(
        name, view, tower_cfg, loss_cfg,
        dataclasses.replace(train,
                            seed=pipeline.member_seed(train.seed, i)),
        os.path.join(model_dir, "variants", name),
        os.path.join(model_dir, "tensorboard", name),
        refit_epochs=results["dat"]["best_epoch"],
        shared_dir=_shared(chief_dir, name))
    metrics[name] = results[name]["test"]
    members.append(built[name])
  name = stem + pipeline.ENSEMBLE_SUFFIX
  built[name] = pipeline.ensemble(members)
  metrics[name] = pipeline.test_metrics(
      pipeline.model_scorer(built[name], len(view.data.items)), view,
      train.eval_batch_size)


def _blend(prep, train, model_dir, metrics, built):
  """The exported model blended with EASE, chosen on validation with dat."""
  stem = pipeline.exported_stem(train)
  name = stem + (pipeline.ENSEMBLE_SUFFIX if train.ensemble > 1 else "")
  if name not in built:
    name = stem if stem in built else "dat"
  view = pipeline.view_for(prep, train, name)
  try:
    blended, info = blend_lib.fit(prep, view, built["dat"], built[name],
                                  train)
  except (ease_lib.TooManyItemsError, np.linalg.LinAlgError,
          ValueError) as e:
    logging.warning("No EASE blend: %s The run exports the towers.", e)
    return
  name += pipeline.BLEND_SUFFIX
  blend_lib.save(blended and blended.blend, info, model_dir, name)
  if blended is None:
    return
  built[name] = blended
  metrics[name] = pipeline.test_metrics(
      pipeline.model_scorer(blended, len(view.data.items)), view,
      train.eval_batch_size)


def _remove_blends(model_dir: str) -> None:
  """Removes the EASE blends of an earlier run: they belong to its towers,
  and must not be exported with new ones (a run that stops before its
  blend is fitted exports its towers alone)."""
  variants = os.path.join(model_dir, "variants")
  for name in os.listdir(variants) if os.path.isdir(variants) else ():
    if name.endswith(pipeline.BLEND_SUFFIX):
      shutil.rmtree(os.path.join(variants, name))


def table(metrics: dict, columns=HEADLINE) -> str:
  """A Markdown table: one row per variant, one column per metric."""
  lines = ["| variant | " + " | ".join(columns) + " |",
           "|---|" + "---|" * len(columns)]
  for name, values in metrics.items():
    lines.append(f"| {name} | " + " | ".join(
        f"{values.get(c, float('nan')):.4f}" for c in columns) + " |")
  return "\n".join(lines)
