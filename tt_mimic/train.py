"""Train, evaluate, report and export: `python -m tt_mimic.train --flagfile=...`.

Reads the flags, runs ingest (cached), trains the compared variants with
full-corpus validation and early stopping, writes `metrics.json`,
`report.md` and the resolved `flags.cfg` to `--model_dir`, exports the DAT
model and prints one user's recommendations.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging

import tt_mimic  # noqa: F401
from tt_mimic import cli_flags

# model
CATEGORY_TOP_K = flags.DEFINE_integer("category_top_k", 300,
                                      "Category vocabulary size.", lower_bound=1)
AUTHOR_TOP_K = flags.DEFINE_integer("author_top_k", 300,
                                    "Author vocabulary size.", lower_bound=1)
TITLE_MAX_TOKENS = flags.DEFINE_integer("title_max_tokens", 20000,
                                        "Title vocabulary size.", lower_bound=2)
TITLE_LENGTH = flags.DEFINE_integer("title_length", 12,
                                    "Title tokens per book.", lower_bound=1)
HISTORY_LENGTH = flags.DEFINE_integer(
    "history_length", 50, "Recent training events per user used as "
    "features (0: none, the towers of the DAT paper).", lower_bound=0)
RECENT_LENGTH = flags.DEFINE_integer(
    "recent_length", 0, "Also pool the user's N most recent history books on "
    "their own (0: only the pool of the whole history).", lower_bound=0)
flags.register_multi_flags_validator(
    ["recent_length", "history_length"],
    lambda f: f["recent_length"] == 0 or f["recent_length"] < f["history_length"],
    "--recent_length must be smaller than --history_length (at or above it, "
    "the recent pool repeats the whole-history pool).")
EMBEDDING_DIM = flags.DEFINE_integer("embedding_dim", 128,
                                     "Feature embedding width.", lower_bound=1)
HIDDEN_UNITS = flags.DEFINE_list("hidden_units", ["256"],
                                 "ReLU layer widths of each tower.")
OUTPUT_DIM = flags.DEFINE_integer("output_dim", 128,
                                  "Tower output (and a_u, a_v) width.",
                                  lower_bound=1)
DROPOUT = flags.DEFINE_float("dropout", 0.0, "Dropout after hidden layers.",
                             lower_bound=0.0, upper_bound=0.9)
USER_ID_DROPOUT = flags.DEFINE_float(
    "user_id_dropout", 0.1, "Training-time chance of hiding the user id.",
    lower_bound=0.0, upper_bound=1.0)
HISTORY_DROPOUT = flags.DEFINE_float(
    "history_dropout", 0.0, "Training-time chance of hiding a user's whole "
    "history.", lower_bound=0.0, upper_bound=1.0)
USER_ID_EMBEDDING = flags.DEFINE_bool(
    "user_id_embedding", True, "Give the user tower a free user-id "
    "embedding (without it, a user is their history, plus a_u under AMM).")
flags.register_multi_flags_validator(
    ["history_length", "user_id_embedding"],
    lambda f: f["history_length"] > 0 or f["user_id_embedding"],
    "--history_length=0 with --nouser_id_embedding leaves the user tower no "
    "input that tells users apart; keep one of them.")
LOSS = flags.DEFINE_enum("loss", "softmax", ["softmax", "bce"],
                         "Main loss: in-batch softmax (TFRS Retrieval, "
                         "log-Q corrected) or DAT's BCE with negatives.")
TEMPERATURE = flags.DEFINE_float("temperature", 0.05, "Score temperature.",
                                 lower_bound=1e-4)
LOG_Q = flags.DEFINE_bool("log_q", True, "Log-Q correction (softmax).")
UNIFORM_NEGATIVES = flags.DEFINE_integer(
    "uniform_negatives", 0, "Uniform corpus negatives mixed into the "
    "softmax per batch; at or above the corpus size, the whole corpus.",
    lower_bound=0)
BCE_NEGATIVES = flags.DEFINE_integer("bce_negatives", 4,
                                     "Negatives per positive for --loss=bce.",
                                     lower_bound=1)
# mimic
USE_AMM = flags.DEFINE_bool("use_amm", True, "Adaptive-Mimic Mechanism.")
USE_CAL = flags.DEFINE_bool("use_cal", True, "Category Alignment Loss.")
LAMBDA_U = flags.DEFINE_float("lambda_u", 0.5, "Weight of loss_u.",
                              lower_bound=0.0)
LAMBDA_V = flags.DEFINE_float("lambda_v", 0.5, "Weight of loss_v.",
                              lower_bound=0.0)
LAMBDA_CA = flags.DEFINE_float("lambda_ca", 1.0, "Weight of loss_CA.",
                               lower_bound=0.0)
# train
BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Batch size.",
                                  lower_bound=2)
EPOCHS = flags.DEFINE_integer("epochs", 10, "Maximum epochs.", lower_bound=1)
OPTIMIZER = flags.DEFINE_enum("optimizer", "adam", ["adam", "adagrad", "adamw"],
                              "Optimizer.")
LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Learning rate.",
                                   lower_bound=0.0)
LR_SCHEDULE = flags.DEFINE_enum(
    "lr_schedule", "constant", ["constant", "cosine"],
    "Learning-rate schedule: constant, or cosine decay to 0 over --epochs.")
WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 1e-4, "AdamW weight decay.",
                                  lower_bound=0.0)
EARLY_STOPPING_METRIC = flags.DEFINE_enum(
    "early_stopping_metric", "recall@20",
    [f"{m}@{k}" for m in ("recall", "ndcg", "hr") for k in (10, 20, 50, 100)]
    + ["mrr"], "Validation metric for early stopping and best weights.")
PATIENCE = flags.DEFINE_integer("patience", 2, "Early-stopping patience "
                                "(0 = off).", lower_bound=0)
EVAL_MAX_USERS = flags.DEFINE_integer(
    "eval_max_users", 20000, "Users evaluated per split (0 = all).",
    lower_bound=0)
VARIANTS = flags.DEFINE_list(
    "variants", ["popularity", "two_tower", "dat_no_cal", "dat"],
    "Variants to train and compare; 'dat' is the exported model.")
DISTRIBUTE = flags.DEFINE_enum(
    "distribute", "none", ["none", "mirrored", "multi_worker"],
    "tf.distribute strategy: mirrored = all local GPUs; multi_worker = "
    "MultiWorkerMirroredStrategy with the cluster in TF_CONFIG.")
VERBOSE = flags.DEFINE_integer("verbose", 1, "Keras progress: 0, 1 or 2.",
                               lower_bound=0, upper_bound=2)
# export
EXPORT = flags.DEFINE_bool("export", True, "Export SavedModels and indexes.")
RECOMMEND_K = flags.DEFINE_integer("recommend_k", 10,
                                   "Recommendations printed at the end.",
                                   lower_bound=0)

FLAGS = flags.FLAGS


def configs():
  """The frozen configs for the library, from the flags."""
  from tt_mimic import features, model, runner, towers  # pylint: disable=g-import-not-at-top
  feature = features.FeatureConfig(
      category_top_k=CATEGORY_TOP_K.value, author_top_k=AUTHOR_TOP_K.value,
      title_max_tokens=TITLE_MAX_TOKENS.value, title_length=TITLE_LENGTH.value,
      history_length=HISTORY_LENGTH.value)
  tower = towers.TowerConfig(
      embedding_dim=EMBEDDING_DIM.value,
      hidden_units=tuple(int(u) for u in HIDDEN_UNITS.value if u),
      output_dim=OUTPUT_DIM.value, dropout=DROPOUT.value,
      use_amm=USE_AMM.value, user_id_dropout=USER_ID_DROPOUT.value,
      recent_length=RECENT_LENGTH.value,
      user_id_embedding=USER_ID_EMBEDDING.value,
      history_dropout=HISTORY_DROPOUT.value)
  loss = model.LossConfig(
      loss=LOSS.value, temperature=TEMPERATURE.value, log_q=LOG_Q.value,
      uniform_negatives=UNIFORM_NEGATIVES.value,
      bce_negatives=BCE_NEGATIVES.value, use_amm=USE_AMM.value,
      use_cal=USE_CAL.value, lambda_u=LAMBDA_U.value, lambda_v=LAMBDA_V.value,
      lambda_ca=LAMBDA_CA.value)
  train = runner.TrainConfig(
      batch_size=BATCH_SIZE.value, epochs=EPOCHS.value,
      optimizer=OPTIMIZER.value, learning_rate=LEARNING_RATE.value,
      lr_schedule=LR_SCHEDULE.value,
      weight_decay=WEIGHT_DECAY.value,
      early_stopping_metric=EARLY_STOPPING_METRIC.value,
      patience=PATIENCE.value, eval_max_users=EVAL_MAX_USERS.value,
      seed=cli_flags.SEED.value, verbose=VERBOSE.value,
      distribute=DISTRIBUTE.value)
  return feature, tower, loss, train


def write_flags(model_dir: str) -> None:
  """Writes the run's resolved flags to <model_dir>/flags.cfg (a flagfile)."""
  os.makedirs(model_dir, exist_ok=True)
  lines = [flag.serialize()
           for module in (cli_flags, sys.modules[__name__])
           for flag in FLAGS.get_flags_for_module(module)]
  with open(os.path.join(model_dir, "flags.cfg"), "w") as f:
    f.write("\n".join(sorted(lines)) + "\n")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from tt_mimic import experiment, ingest, report, runner  # pylint: disable=g-import-not-at-top
  model_dir = cli_flags.MODEL_DIR.value
  write_flags(model_dir)
  feature, tower, loss, train = configs()
  unknown = set(VARIANTS.value) - set(experiment.VARIANTS)
  if unknown:
    raise app.UsageError(f"Unknown --variants {sorted(unknown)}; choose from "
                         f"{list(experiment.VARIANTS)}.")
  try:
    data = ingest.run_cached(cli_flags.ingest_config(), model_dir,
                             cli_flags.CACHE_DIR.value)
  except ingest.IngestError as e:
    raise SystemExit(f"ingest failed: {e}") from None
  prep = runner.prepare(data, feature, train)
  variants = tuple(v for v in experiment.VARIANTS if v in VARIANTS.value)
  try:
    metrics, results, built = experiment.run(prep, tower, loss, train,
                                             variants, model_dir)
  except runner.NonFiniteLossError as e:
    raise SystemExit(str(e)) from None
  report.write(model_dir, prep, metrics, results, built)
  if EXPORT.value and "dat" in built:
    from tt_mimic import export  # pylint: disable=g-import-not-at-top
    export.export_run(model_dir, prep, built["dat"], cli_flags.export_config())
    if RECOMMEND_K.value:
      from tt_mimic import recommend  # pylint: disable=g-import-not-at-top
      recommend.print_example(model_dir, prep, RECOMMEND_K.value)


if __name__ == "__main__":
  app.run(main)
