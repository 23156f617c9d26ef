"""Trains and evaluates one model variant.

A variant lives in its own directory with its checkpoints (resumable
through `tf.keras.callbacks.BackupAndRestore`), its best weights (by the
validation early-stopping metric, computed over the full corpus), its
TensorBoard logs and a `result.json`. A finished variant is not retrained
when the same run is started again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time

from absl import logging

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tt_mimic.config import LossConfig
from tt_mimic.config import TowerConfig
from tt_mimic.config import TrainConfig
from tt_mimic.config import same_settings
from tt_mimic.data import pipeline as data_lib
from tt_mimic.training import evaluation
from tt_mimic.training import optimizers
from tt_mimic.training import pipeline
from tt_mimic.training.pipeline import Built
from tt_mimic.training.pipeline import Prepared


def make_optimizer(config: TrainConfig,
                   steps_per_epoch: int = 1) -> tf.keras.optimizers.Optimizer:
  """The optimizer of `config`; a schedule spans `epochs * steps_per_epoch`."""
  if config.lr_schedule == "constant":
    lr = config.learning_rate
  elif config.lr_schedule == "cosine":
    lr = tf.keras.optimizers.schedules.CosineDecay(
        config.learning_rate, max(1, config.epochs * steps_per_epoch))
  else:
    raise ValueError(f"Unknown lr_schedule {config.lr_schedule!r}; expected "
                     "constant or cosine.")
  # Weight averaging: Keras keeps the average inside the optimizer (its
  # variables, so a backup holds it) and `fit` ends by writing it into the
  # model; `averaged_weights` swaps it in for each epoch's validation.
  ema = {"use_ema": config.ema_momentum > 0,
         "ema_momentum": config.ema_momentum}
  optimizer = {
      "adam": lambda: tf.keras.optimizers.Adam(lr, **ema),
      "lazy_adam": lambda: optimizers.LazyAdam(lr, **ema),
      "catchup_adam": lambda: optimizers.CatchUpAdam(lr, **ema),
      "adagrad": lambda: tf.keras.optimizers.Adagrad(lr, **ema),
      "adamw": lambda: tf.keras.optimizers.AdamW(
          lr, weight_decay=config.weight_decay, **ema),
  }[config.optimizer]()
  if config.precision == "mixed_float16":
    # float16 gradients underflow without loss scaling (DATModel.train_step
    # scales the loss and unscales the gradients).
    optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
  return optimizer


@contextlib.contextmanager
def averaged_weights(model: tf.keras.Model):
  """Within the block the model holds its optimizer's moving average of the
  trainable weights (`--ema_momentum`); the trained weights come back after
  it. Without weight averaging the block holds the trained weights (with
  `--optimizer=catchup_adam`, brought up to the current step)."""
  catch_up(model)
  if not _averaging(model):
    yield
    return
  # A copy of the trained weights while the block runs (tables included:
  # memory for one more set of weights during validation).
  trained = [tf.identity(v) for v in model.trainable_variables]
  write_average(model)
  try:
    yield
  finally:
    for variable, value in zip(model.trainable_variables, trained):
      variable.assign(value)


def catch_up(model: tf.keras.Model) -> None:
  """Brings a CatchUpAdam's pending row updates into `model`'s weights (and
  their average), so they can be read; nothing for other optimizers."""
  optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
  if isinstance(optimizer, optimizers.CatchUpAdam):
    optimizer.catch_up(model.trainable_variables)


def _averaging(model: tf.keras.Model):
  """The optimizer that keeps `model`'s weight average, or None (also
  before its first step, when the average is the weights themselves)."""
  optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
  if (not getattr(optimizer, "use_ema", False)
      # get_value: the step count is a MirroredVariable under tf.distribute.
      or int(tf.keras.backend.get_value(optimizer.iterations)) == 0):
    return None
  return optimizer


def write_average(model: tf.keras.Model) -> None:
  """Writes the weight average into `model` (as `fit` does when it ends);
  without one, a CatchUpAdam's pending rows are still brought in."""
  optimizer = _averaging(model)
  if optimizer is not None:
    # (CatchUpAdam's finalize_variable_values catches up first.)
    optimizer.finalize_variable_values(model.trainable_variables)
  else:
    catch_up(model)


_STRATEGIES = {}


def strategy(kind: str) -> tf.distribute.Strategy:
  """The process's tf.distribute strategy of `kind` (created once)."""
  if kind == "none":
    return tf.distribute.get_strategy()
  if kind not in _STRATEGIES:
    if kind == "mirrored":
      # All local GPUs; without one, every logical CPU device (so the code
      # path runs, and is tested, on a CPU-only machine).
      devices = [d.name for d in tf.config.list_logical_devices("GPU")]
      devices = devices or [d.name for d in tf.config.list_logical_devices("CPU")]
      _STRATEGIES[kind] = tf.distribute.MirroredStrategy(devices)
    elif kind == "multi_worker":
      _STRATEGIES[kind] = tf.distribute.MultiWorkerMirroredStrategy()
    else:
      raise ValueError(f"Unknown distribute {kind!r}; expected none, "
                       "mirrored or multi_worker.")
  return _STRATEGIES[kind]


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes the run: always, except for the non-chief
  workers of a multi-worker cluster (TF_CONFIG)."""
  return bool(getattr(strategy.extended, "should_checkpoint", True))


class NonFiniteLossError(FloatingPointError):
  """A loss term became NaN or infinite during training."""


class FullCorpusValidation(tf.keras.callbacks.Callback):
  """Validation over the full corpus each epoch, early stopping, best weights.

  Its state lives in `<directory>/early_stopping.json` and the best weights
  in `<directory>/best/`, so a resumed run continues where it stopped.
  """

  def __init__(self, built: Built, prep: Prepared, config: TrainConfig,
               directory: str, writer, shared_dir: str | None = None):
    """`shared_dir`: for a non-chief worker, the chief's variant directory,
    whose state a resumed run starts from (the chief and every worker then
    make the same early-stopping decisions)."""
    super().__init__()
    self.built, self.prep, self.config = built, prep, config
    self.directory = directory
    self.state_path = os.path.join(directory, "early_stopping.json")
    self.start_path = os.path.join(shared_dir or directory,
                                   "early_stopping.json")
    self.best_path = os.path.join(directory, "best", "weights")
    self.writer = writer
    self.state = {"best": -1.0, "best_epoch": -1, "wait": 0, "history": []}
    self.saved_epoch = None  # the epoch whose weights this process saved

  def on_train_begin(self, logs=None):
    if os.path.exists(self.start_path):
      with open(self.start_path) as f:
        self.state = json.load(f)

  def on_epoch_end(self, epoch, logs=None):
    if any(h["epoch"] == epoch + 1 for h in self.state["history"]):
      return  # already validated before a resume
    with averaged_weights(self.model):
      self._validate(epoch, logs)

  def _validate(self, epoch, logs):
    scorer = pipeline.model_scorer(self.built, len(self.prep.data.items))
    metrics = evaluation.evaluate(scorer, self.prep.val,
                                  batch_size=self.config.eval_batch_size)
    value = metrics[self.config.early_stopping_metric]
    entry = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()},
             **{f"val_{k}": float(v) for k, v in metrics.items()}}
    self.state["history"].append(entry)
    # Step `epoch` (0-based), the step of Keras' own epoch series in
    # train/, so a chart of both lines the same epoch up.
    with self.writer.as_default(step=epoch):
      for name in ("recall@20", "ndcg@20", "recall@100", "mrr"):
        tf.summary.scalar(f"validation/{name}", metrics[name])
      lr = self.model.optimizer.learning_rate
      tf.summary.scalar("learning_rate", float(tf.keras.backend.get_value(lr)))
    if value > self.state["best"]:
      self.state.update(best=float(value), best_epoch=epoch + 1, wait=0)
      self.built.model.save_weights(self.best_path)
      self.saved_epoch = epoch + 1
    else:
      self.state["wait"] += 1
      if self.config.patience and self.state["wait"] >= self.config.patience:
        self.model.stop_training = True
    logging.info("epoch %d: validation %s = %.4f (best %.4f at epoch %d)",
                 epoch + 1, self.config.early_stopping_metric, value,
                 self.state["best"], self.state["best_epoch"])
    with open(self.state_path + ".tmp", "w") as f:
      json.dump(self.state, f, indent=1)
    os.replace(self.state_path + ".tmp", self.state_path)


def train_variant(name: str, prep: Prepared, tower_config: TowerConfig,
                  loss_config: LossConfig, config: TrainConfig,
                  directory: str, tensorboard_dir: str | None = None,
                  refit_epochs: int = 0,
                  shared_dir: str | None = None) -> tuple[Built, dict]:
  """Trains (or resumes, or reloads) one variant and evaluates it on test.

  With `refit_epochs`, trains exactly that many epochs without validation
  (a refit on training plus validation events: `prep` is then
  `pipeline.refit_view`'s) and keeps the last weights as the best.

  `shared_dir`: for a non-chief worker of a cluster, which trains in a
  private `directory`, the chief's variant directory. Every worker restores
  from its backups and starts from its state (a variant it finished, the
  validation history and early-stopping counters, the best weights), so
  that all make the chief's decisions and their collective ops stay in step.

  Returns:
    The built model holding the best weights, and its result dict with
    `test` metrics, `history` (per-epoch losses and validation metrics),
    `best_epoch` and `seconds`.
  """
  if refit_epochs:
    config = dataclasses.replace(config, epochs=refit_epochs, patience=0)
  _claim(directory, {"refit_epochs": refit_epochs,
                      "tower": dataclasses.asdict(tower_config),
                      "loss": dataclasses.asdict(loss_config),
                      "train": dataclasses.asdict(config),
                      "features": dataclasses.asdict(prep.feature_config),
                      "data": prep.data.report.get("config", {})})
  tensorboard_dir = tensorboard_dir or os.path.join(directory, "tensorboard")
  tf.keras.utils.set_random_seed(config.seed)
  with strategy(config.distribute).scope():
    built = pipeline.build(prep, tower_config, loss_config, config.seed,
                           config.precision)
    steps = -(-len(prep.sequence) // config.batch_size)
    built.model.compile(optimizer=make_optimizer(config, steps))
    pipeline.create_variables(built, prep)
  result_path = os.path.join(directory, "result.json")
  finished_path = os.path.join(shared_dir or directory, "result.json")
  validation = FullCorpusValidation(
      built, prep, config, directory,
      # A refit never validates: no empty validation run in TensorBoard.
      None if refit_epochs else tf.summary.create_file_writer(
          os.path.join(tensorboard_dir, "validation")), shared_dir)
  start = time.time()
  if os.path.exists(finished_path):
    logging.info("[%s] finished earlier; reloading its best weights.", name)
    with open(finished_path) as f:
      result = json.load(f)
  else:
    backup_dir = os.path.join(shared_dir or directory, "backup")
    first_epoch = resumed_epoch(backup_dir)
    dataset = data_lib.train_dataset(prep.sequence, prep.user_id_index,
                                     prep.feature_config.history_length,
                                     config.batch_size, config.seed,
                                     config.train_history,
                                     epochs=config.epochs,
                                     first_epoch=first_epoch,
                                     user_weight_power=config.user_weight_power)
    callbacks = [
        # Validation first: a backup must never get ahead of the validation
        # state, or a crash in between would lose that epoch's validation.
        *([] if refit_epochs else [validation]),
        tf.keras.callbacks.BackupAndRestore(backup_dir),
        tf.keras.callbacks.TensorBoard(tensorboard_dir,
                                       update_freq="epoch", profile_batch=0),
    ]
    logging.info("[%s] training: %d events, batch %d, up to %d epochs%s", name,
                 len(prep.sequence), config.batch_size, config.epochs,
                 f" (resuming at epoch {first_epoch + 1})" if first_epoch
                 else "")
    built.model.built = True  # lets BackupAndRestore restore the optimizer
    try:
      # One stream over the remaining epochs, each in its (seed, epoch)
      # order: BackupAndRestore restores the weights, the optimizer and the
      # random generator's state at the start of `first_epoch`, so a
      # resumed run computes what the uninterrupted one does.
      built.model.fit(dataset, epochs=config.epochs, steps_per_epoch=steps,
                      callbacks=callbacks, verbose=config.verbose)
    except tf.errors.InvalidArgumentError as e:
      if "non-finite" not in e.message:
        raise
      detail = next((line.strip() for line in e.message.splitlines()
                     if "non-finite" in line), e.message.splitlines()[0])
      raise NonFiniteLossError(
          f"[{name}] training diverged: {detail}. Lower "
          "--learning_rate or raise --temperature; no metric is reported "
          "for this run.") from None
    if refit_epochs:
      # `fit` has written the weight average into the model: the refit
      # keeps its averaged weights.
      built.model.save_weights(validation.best_path)
      result = {"history": [], "best_epoch": refit_epochs, "refit": True}
    else:
      result = {"history": validation.state["history"],
                "best_epoch": validation.state["best_epoch"]}
  if result["best_epoch"] < 1:
    raise evaluation.DivergedError(f"[{name}] no epoch finished validation.")
  best_path = validation.best_path
  if shared_dir and not refit_epochs and (
      validation.saved_epoch != result["best_epoch"]):
    # The best epoch came before this worker's restart: the chief holds it.
    best_path = os.path.join(shared_dir, "best", "weights")
  built.model.load_weights(best_path).expect_partial()
  if "test" not in result:
    scorer = pipeline.model_scorer(built, len(prep.data.items))
    result["test"] = pipeline.test_metrics(scorer, prep,
                                           config.eval_batch_size)
    result["seconds"] = round(time.time() - start, 1)
    with open(result_path, "w") as f:
      json.dump(result, f, indent=1)
  return built, result


def resumed_epoch(backup_dir: str) -> int:
  """The epoch (0-based) that `BackupAndRestore` resumes from `backup_dir`.

  Its checkpoint records the last finished epoch (`ckpt_saved_epoch`);
  training restarts at the next one. 0 without a checkpoint.
  """
  path = tf.train.latest_checkpoint(os.path.join(backup_dir, "chief"))
  if path is None:
    return 0
  reader = tf.train.load_checkpoint(path)
  key = "ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE"
  if not reader.has_tensor(key):
    raise ValueError(f"{path} is not a BackupAndRestore checkpoint (no {key}).")
  return int(reader.get_tensor(key)) + 1


# Training settings that do not shape a variant: Keras's progress output,
# which variants the run trains, whether dat is refit afterwards (a refit
# is a variant of its own, stamped with its refit_epochs; so a run made
# with --norefit resumes with --refit) and how many members the exported
# model has (each member is a variant of its own, stamped with its seed),
# nor the EASE blend, fitted after the towers.
_NOT_SHAPING = ("verbose", "variants", "refit", "ensemble", "ease_weights",
                "ease_lambdas", "ease_popularity_powers", "ease_top_k",
                "ease_max_items", "ease_neighbours")


# The input files in a stamp's data section: compared as the files they
# name now, however the path is spelled (relative or absolute, links), and
# written as given (a relative path keeps following the working directory).
_DATA_PATHS = ("books_csv", "users_csv")


def _shaping(settings: dict) -> dict:
  """A stamp without the settings of `_NOT_SHAPING`. Stamps written before
  2026-12-06 hold them (verbose 0, variants None, refit as run)."""
  if "train" not in settings:
    return settings
  return {**settings, "train": {k: v for k, v in settings["train"].items()
                                if k not in _NOT_SHAPING}}


def _resolved(settings: dict) -> dict:
  """`settings` with its input files' paths resolved (a relative one from
  the working directory), for comparing stamps."""
  if not isinstance(settings.get("data"), dict):
    return settings
  return {**settings, "data": {
      k: os.path.realpath(v) if k in _DATA_PATHS and v else v
      for k, v in settings["data"].items()}}


def _claim(directory: str, settings: dict) -> None:
  """Keeps a variant directory only if it was made with the same settings.

  A finished or interrupted run is resumed only when every setting that
  shapes the result matches (the input files as the files they name);
  otherwise its directory is cleared.
  """
  settings = _shaping(settings)
  path = os.path.join(directory, "settings.json")
  text = json.dumps(settings, sort_keys=True, indent=1, default=str)
  if os.path.exists(path):
    with open(path) as f:
      if same_settings(_resolved(_shaping(json.load(f))),
                       _resolved(settings)):
        return
    logging.warning("%s was trained with other settings; starting over.",
                    directory)
    shutil.rmtree(directory)
  os.makedirs(directory, exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
