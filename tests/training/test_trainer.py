"""Tests for tt_mimic.training.trainer: end-to-end `tt-mimic train` runs on
a tiny generated dataset, divergence, resume after a kill, the optimizer's
learning-rate schedule."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from unittest import mock

from absl import flags
from absl.testing import flagsaver
import numpy as np

import tt_mimic  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from tt_mimic.commands import train
from tt_mimic.config import FeatureConfig
from tt_mimic.config import LossConfig
from tt_mimic.config import TowerConfig
from tt_mimic.config import TrainConfig
from tt_mimic.data import features
from tt_mimic.model import dat as model_lib
from tt_mimic.training import evaluation
from tt_mimic.training import experiment
from tt_mimic.training import pipeline
from tt_mimic.training import trainer

import tiny_data

FLAGS = flags.FLAGS
REPO = tiny_data.REPO
TRAINED = ("id_only", "two_tower", "dat_no_cal", "dat")
# The full default run: every variant, then dat's refit beside popularity's.
REPORTED = experiment.VARIANTS + ("popularity_refit", "dat_refit")


def setUpModule():
  if not FLAGS.is_parsed():
    FLAGS.mark_as_parsed()


def run_main(values: dict) -> float:
  """Runs train.main under the given flags; returns the seconds it took."""
  start = time.time()
  with flagsaver.flagsaver(**values):
    train.main(["train"])
  return time.time() - start


def tiny_prep(root):
  """A prepared 120-user tiny dataset, histories of 5, 50 evaluated users."""
  return pipeline.prepare(tiny_data.ingested(root, n_users=120),
                          FeatureConfig(history_length=5),
                          TrainConfig(eval_max_users=50))


def read_json(path):
  with open(path) as f:
    return json.load(f)


def scalar_events(directory):
  """{tag: [(step, value), ...]} of every event file under `directory`."""
  out = {}
  for path in sorted(glob.glob(os.path.join(directory, "events.out.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        value = float(tf.make_ndarray(v.tensor)) if v.HasField(
            "tensor") else v.simple_value
        out.setdefault(v.tag, []).append((event.step, value))
  return out


class MetricsMixin:

  def assertSaneMetrics(self, metrics, variants):
    self.assertEqual(sorted(metrics), sorted(variants))
    for name, values in metrics.items():
      self.assertGreater(values["users"], 0, name)
      for key, value in values.items():
        if key in ("users", "segments"):
          continue
        self.assertTrue(np.isfinite(value), (name, key))
        self.assertBetween(value, 0.0, 1.0, (name, key))
      for prefix in ("recall", "hr"):
        series = [values[f"{prefix}@{k}"] for k in evaluation.KS]
        self.assertEqual(series, sorted(series), (name, prefix))


class TrainEndToEndTest(tf.test.TestCase, MetricsMixin):
  """One full run of the four variants, shared by the tests of the class."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    setUpModule()
    cls.root = tempfile.mkdtemp(prefix="tt_mimic_train_")
    cls.dataset = tiny_data.write_dataset(cls.root, "small")
    cls.model_dir = os.path.join(cls.root, "run")
    cls.values = tiny_data.train_flags(cls.dataset, cls.model_dir,
                                       variants=list(experiment.VARIANTS),
                                       refit=True)
    cls.first_seconds = run_main(cls.values)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def path(self, *parts):
    return os.path.join(self.model_dir, *parts)

  def test_flags_cfg_is_a_flagfile_of_the_run(self):
    text = open(self.path("flags.cfg")).read()
    self.assertIn("--embedding_dim=8\n", text)
    self.assertIn("--noexport\n", text)
    with flagsaver.flagsaver():
      FLAGS(["train", f"--flagfile={self.path('flags.cfg')}"])
      self.assertEqual(FLAGS.model_dir, self.model_dir)
      self.assertEqual(FLAGS.books_csv, self.dataset.books_csv)
      self.assertEqual(FLAGS.embedding_dim, 8)
      self.assertEqual(FLAGS.hidden_units, ["16"])
      self.assertEqual(FLAGS.variants, list(experiment.VARIANTS))
      self.assertFalse(FLAGS.export)
      self.assertEqual(FLAGS.min_item_interactions, 2)
      self.assertEqual(FLAGS.learning_rate, 1e-3)

  def test_ingest_report(self):
    report = read_json(self.path("ingest_report.json"))
    self.assertEqual(report["books"]["read"], len(self.dataset.books))
    self.assertEqual(report["events"]["read"], len(self.dataset.events))
    self.assertEqual(report["config"]["min_item_interactions"], 2)
    # Every book has some empty price: counted, not dropped.
    self.assertGreater(report["invalid_values"]["price"]["missing"], 0)
    self.assertEqual(report["books"]["kept"], len(self.dataset.books))

  def test_metrics_json(self):
    metrics = read_json(self.path("metrics.json"))
    self.assertSaneMetrics(metrics, REPORTED)
    self.assertEqual(list(metrics), list(REPORTED))
    for name in TRAINED + ("dat_refit",):
      self.assertEqual(metrics[name],
                       read_json(self.path("variants", name,
                                           "result.json"))["test"])
    # Not the all-ones of a leaked evaluation.
    self.assertLess(metrics["dat"]["recall@10"], 1.0)

  def test_report_has_the_metrics_table(self):
    report = open(self.path("report.md")).read()
    metrics = read_json(self.path("metrics.json"))
    self.assertIn(experiment.table(metrics), report)
    for name in REPORTED:
      self.assertIn(f"| {name} | {metrics[name]['recall@20']:.4f} |", report)
    self.assertIn("## Where each variant hits (test segments)", report)

  def test_segments_cover_every_test_user_and_book(self):
    metrics = read_json(self.path("metrics.json"))
    for name, values in metrics.items():
      segments = values["segments"]
      self.assertEqual(sum(s["users"] for s in
                           segments["user_activity"].values()),
                       values["users"], name)
      targets = sum(s["targets"] for s in segments["item_popularity"].values())
      for kind in ("cold_books", "category"):
        self.assertEqual(sum(s["targets"] for s in segments[kind].values()),
                         targets, (name, kind))
      for kind, table in segments.items():
        for segment, row in table.items():
          self.assertBetween(row["recall@20"], 0.0, 1.0, (name, segment))

  def test_refit_trains_the_chosen_epochs_on_train_and_validation(self):
    dat = read_json(self.path("variants", "dat", "result.json"))
    refit = read_json(self.path("variants", "dat_refit", "result.json"))
    self.assertEqual(refit["best_epoch"], dat["best_epoch"])
    self.assertTrue(refit["refit"])
    self.assertTrue(os.path.exists(
        self.path("variants", "dat_refit", "best", "weights.index")))
    config, prep = pipeline.open_run(self.model_dir)
    view = pipeline.refit_view(prep, config.train)
    split = prep.data.events["split"]
    self.assertEqual(len(prep.sequence), int((split == 0).sum()))
    self.assertEqual(len(view.sequence), int((split <= 1).sum()))
    # Test users see their validation book in the features and the mask.
    events = prep.data.events
    val = events[events["split"] == 1].groupby("user")["item"].first()
    for user, seen, history in zip(prep.test.users, prep.test.seen,
                                   prep.test.history):
      if user in val.index:
        self.assertIn(val[user], seen)
        self.assertEqual(history[0], val[user])  # the latest known book
    self.assertEqual(pipeline.exported_variant(self.model_dir), "dat_refit")

  def test_variant_directories(self):
    for name in TRAINED:
      directory = self.path("variants", name)
      self.assertTrue(os.path.exists(
          os.path.join(directory, "best", "weights.index")), name)
      state = read_json(os.path.join(directory, "early_stopping.json"))
      self.assertEqual([h["epoch"] for h in state["history"]], [1, 2])
      self.assertIn(state["best_epoch"], (1, 2))
      for h in state["history"]:
        for term in ("loss_main", "loss_u", "loss_v", "loss_ca"):
          self.assertTrue(np.isfinite(h[term]), (name, term))
      amm = name not in ("two_tower", "id_only")
      self.assertEqual(state["history"][0]["loss_u"] > 0, amm, name)
      self.assertEqual(state["history"][0]["loss_ca"] > 0, name == "dat", name)

  def test_tensorboard_logs(self):
    for name in TRAINED:
      base = self.path("tensorboard", name)
      for part in ("train", "validation"):
        self.assertTrue(glob.glob(os.path.join(base, part, "events.out.*")),
                        (name, part))
      train_tags = scalar_events(os.path.join(base, "train"))
      self.assertEqual(sorted(s for s, _ in train_tags["epoch_loss_main"]),
                       [0, 1])
      val_tags = scalar_events(os.path.join(base, "validation"))
      # The same steps as the train series: one chart lines epochs up.
      self.assertEqual(sorted(s for s, _ in val_tags["validation/recall@20"]),
                       [0, 1])
      # epoch_loss is the epoch mean of the weighted terms (each itself an
      # epoch mean), not the last (partial) batch's value.
      values = {tag: dict(series) for tag, series in train_tags.items()}
      for step in (0, 1):
        terms = (values["epoch_loss_main"][step]
                 + 0.5 * values["epoch_loss_u"][step]
                 + 0.5 * values["epoch_loss_v"][step]
                 + 1.0 * values["epoch_loss_ca"][step])
        self.assertAllClose(values["epoch_loss"][step], terms, rtol=1e-4,
                            msg=name)
        self.assertAllClose(values["epoch_total_loss"][step],
                            values["epoch_loss"][step], rtol=1e-6)

  def test_a_refit_logs_training_but_no_empty_validation_run(self):
    base = self.path("tensorboard", "dat_refit")
    self.assertTrue(glob.glob(os.path.join(base, "train", "events.out.*")))
    self.assertFalse(glob.glob(os.path.join(base, "validation", "*")))

  def test_projector_is_a_tensorboard_run(self):
    # An event file makes TensorBoard list the projector directory as a run
    # when it is given the run's (or a parent) directory.
    directory = self.path("tensorboard", "projector")
    self.assertTrue(glob.glob(os.path.join(directory, "events.out.*")))
    self.assertTrue(os.path.exists(os.path.join(directory,
                                                "projector_config.pbtxt")))
    tags = scalar_events(directory)
    self.assertEqual(tags["projector/books"][0][0], 0)

  def test_second_run_reuses_finished_variants(self):
    metrics = read_json(self.path("metrics.json"))
    stamps = {name: os.path.getmtime(self.path("variants", name,
                                               "early_stopping.json"))
              for name in TRAINED}
    seconds = run_main(self.values)
    self.assertEqual(read_json(self.path("metrics.json")), metrics)
    for name in TRAINED:
      self.assertEqual(os.path.getmtime(
          self.path("variants", name, "early_stopping.json")), stamps[name])
    self.assertLess(seconds, self.first_seconds)


class DivergenceTest(tf.test.TestCase, MetricsMixin):

  def setUp(self):
    super().setUp()
    setUpModule()
    self.root = self.get_temp_dir()
    self.dataset = tiny_data.write_dataset(self.root, "small", n_users=120)

  def test_absurd_learning_rate_stops_the_run(self):
    model_dir = os.path.join(self.root, "diverged")
    values = tiny_data.train_flags(
        self.dataset, model_dir, learning_rate=1e30,
        variants=["popularity", "two_tower"])
    with self.assertRaises(SystemExit) as raised:
      run_main(values)
    message = str(raised.exception.code)
    self.assertIn("[two_tower] training diverged", message)
    self.assertFalse(os.path.exists(os.path.join(model_dir, "metrics.json")))
    self.assertFalse(os.path.exists(
        os.path.join(model_dir, "variants", "two_tower", "result.json")))

  def _train_with_nan_cal(self):
    """Trains 'dat' with a CAL that is NaN inside model.fit; returns error."""
    real = model_lib.losses.category_alignment_loss

    def nan_in_training(embeddings, categories, min_count=2):
      value = real(embeddings, categories, min_count)
      # NaN inside model.fit's tf.function only, not in the eager warm-up.
      return value if tf.executing_eagerly() else value * np.nan

    ingested = tiny_data.ingested(self.root)
    prep = pipeline.prepare(ingested, FeatureConfig(history_length=5),
                            TrainConfig(eval_max_users=50))
    directory = os.path.join(self.root, "variant")
    with mock.patch.object(model_lib.losses, "category_alignment_loss",
                           nan_in_training):
      with self.assertRaises(trainer.NonFiniteLossError) as raised:
        trainer.train_variant(
            "dat", prep, TowerConfig(8, (16,), 8), LossConfig(),
            TrainConfig(batch_size=64, epochs=1, verbose=0,
                        eval_max_users=50),
            directory)
    self.assertFalse(os.path.exists(os.path.join(directory, "result.json")))
    return str(raised.exception)

  def test_nan_loss_term_raises_non_finite_loss_error(self):
    message = self._train_with_nan_cal()
    self.assertIn("[dat] training diverged", message)
    self.assertIn("no metric is reported", message)

  def test_divergence_message_names_the_loss_term(self):
    self.assertIn("non-finite loss_ca", self._train_with_nan_cal())

  def test_all_empty_numeric_columns(self):
    data_dir = os.path.join(self.root, "empty")
    os.makedirs(data_dir)
    dataset = tiny_data.write_dataset(data_dir, "small", n_users=160,
                                      empty_numerics=True)
    model_dir = os.path.join(self.root, "empty_run")
    run_main(tiny_data.train_flags(dataset, model_dir,
                                   variants=["popularity", "dat"]))
    report = read_json(os.path.join(model_dir, "ingest_report.json"))
    for column in features.NUMERIC_COLUMNS:
      self.assertEqual(report["invalid_values"][column]["missing"],
                       len(dataset.books))
    metrics = read_json(os.path.join(model_dir, "metrics.json"))
    self.assertSaneMetrics(metrics, ["popularity", "dat"])
    for name, values in metrics.items():
      self.assertFalse(all(v == 1.0 for k, v in values.items()
                           if k not in ("users", "segments")), name)
      self.assertLess(values["recall@10"], 1.0, name)
    state = read_json(os.path.join(model_dir, "variants", "dat",
                                   "early_stopping.json"))
    for h in state["history"]:
      self.assertTrue(all(np.isfinite(v) for v in h.values()), h)


class LearningRateScheduleTest(tf.test.TestCase):

  def _rates(self, schedule, steps):
    config = TrainConfig(learning_rate=0.1, epochs=2, lr_schedule=schedule)
    optimizer = trainer.make_optimizer(config, steps_per_epoch=5)
    var = tf.Variable([1.0])
    rates = []
    for _ in range(steps):
      optimizer.apply_gradients([(tf.constant([1.0]), var)])
      rates.append(float(tf.keras.backend.get_value(optimizer.learning_rate)))
    return rates

  def test_cosine_decays_to_zero_over_all_epochs(self):
    rates = self._rates("cosine", 10)
    self.assertAllClose(rates[0], 0.1, atol=1e-6)  # evaluated at step 0
    self.assertAllClose(rates[5], 0.05, atol=1e-6)  # half-way: cos(pi/2)
    self.assertTrue(all(a > b for a, b in zip(rates, rates[1:])), rates)
    self.assertLess(rates[-1], 0.01)

  def test_constant(self):
    self.assertAllClose(self._rates("constant", 4), [0.1] * 4)

  def test_unknown_schedule(self):
    with self.assertRaisesRegex(ValueError, "lr_schedule.*'step' is not one of"):
      trainer.make_optimizer(TrainConfig(lr_schedule="step"))


class ResumeTest(tf.test.TestCase):
  """A run killed mid-training resumes from its last backup, not epoch 1,
  and ends with the weights and metrics of a run never killed."""

  EPOCHS = 6

  def _command(self, model_dir):
    # dat: every random draw of the model (id and history dropout) is used.
    values = tiny_data.train_flags(
        self.dataset, model_dir, epochs=self.EPOCHS, patience=0,
        variants=["dat"], batch_size=32)
    return [sys.executable, "-m", "tt_mimic", "train",
            *tiny_data.as_argv(values)]

  def setUp(self):
    super().setUp()
    self.root = self.get_temp_dir()
    self.dataset = tiny_data.write_dataset(self.root, "small", n_users=160)

  def test_sigkill_then_resume(self):
    model_dir = os.path.join(self.root, "resume")
    variant = os.path.join(model_dir, "variants", "dat")
    state_path = os.path.join(variant, "early_stopping.json")
    command = self._command(model_dir)
    log = open(os.path.join(self.root, "first.log"), "w")
    first = subprocess.Popen(command, cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT)
    validated = []
    try:
      deadline = time.time() + 240
      while time.time() < deadline and first.poll() is None:
        # The CheckpointManager's "checkpoint" file is written (atomically)
        # after the checkpoint data: before it, the backup is not complete
        # and a resume correctly starts over.
        checkpoints = glob.glob(os.path.join(variant, "backup", "**",
                                             "checkpoint"), recursive=True)
        if checkpoints and os.path.exists(state_path):
          try:
            validated = [h["epoch"] for h in read_json(state_path)["history"]]
          except ValueError:  # caught mid-write
            validated = []
          if validated:
            time.sleep(0.3)  # into the next epoch's batches
            first.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    finally:
      if first.poll() is None:
        first.kill()
      first.wait(timeout=60)
      log.close()
    self.assertEqual(first.returncode, -signal.SIGKILL,
                     open(os.path.join(self.root, "first.log")).read()[-3000:])
    self.assertTrue(validated)
    self.assertLess(max(validated), self.EPOCHS)
    self.assertFalse(os.path.exists(os.path.join(variant, "result.json")))
    train_dir = os.path.join(model_dir, "tensorboard", "dat", "train")
    before = set(glob.glob(os.path.join(train_dir, "events.out.*")))

    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    self.assertEqual(second.returncode, 0, second.stderr[-3000:])
    state = read_json(state_path)
    epochs = [h["epoch"] for h in state["history"]]
    self.assertEqual(epochs, list(range(1, self.EPOCHS + 1)))
    self.assertTrue(os.path.exists(os.path.join(variant, "result.json")))
    self.assertTrue(os.path.exists(os.path.join(model_dir, "metrics.json")))
    # The resumed process trained only epochs after the last backup: its
    # TensorBoard epoch steps (0-based) start after epoch 1, not at 0.
    new = sorted(set(glob.glob(os.path.join(train_dir, "events.out.*")))
                 - before)
    self.assertLen(new, 1)
    steps = []
    for event in tf.compat.v1.train.summary_iterator(new[0]):
      for v in event.summary.value:
        if v.tag == "epoch_loss_main":
          steps.append(event.step)
    info = f"validated before the kill: {validated}; resumed steps: {steps}"
    self.assertEqual(len(steps), len(set(steps)), info)
    self.assertEqual(steps[-1], self.EPOCHS - 1, info)
    self.assertGreaterEqual(min(steps), max(1, max(validated) - 1), info)

    # The same command never killed: the same history, metrics and weights.
    fresh_dir = os.path.join(self.root, "fresh")
    third = subprocess.run(self._command(fresh_dir), cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    self.assertEqual(third.returncode, 0, third.stderr[-3000:])
    fresh = os.path.join(fresh_dir, "variants", "dat")
    resumed, never = (read_json(os.path.join(d, "result.json"))
                      for d in (variant, fresh))
    self.assertEqual(resumed["best_epoch"], never["best_epoch"])
    for name, value in never["test"].items():
      self.assertAllClose(resumed["test"][name], value, atol=5e-5, msg=name)
    for a, b in zip(resumed["history"], never["history"]):
      for name in ("loss", "val_recall@20", "val_ndcg@20"):
        self.assertAllClose(a[name], b[name], atol=5e-5, msg=f"{name} {a}")
    weights = [tf.train.load_checkpoint(os.path.join(d, "best", "weights"))
               for d in (variant, fresh)]
    names = [k for k in weights[0].get_variable_to_shape_map()
             if "OPTIMIZER_SLOT" not in k and k.endswith("VARIABLE_VALUE")]
    self.assertGreater(len(names), 5)
    for key in names:
      self.assertAllClose(weights[0].get_tensor(key),
                          weights[1].get_tensor(key), atol=1e-6, msg=key)


class CrashDuringValidationTest(tf.test.TestCase):
  """A crash while epoch N is being validated must not lose epoch N."""

  def test_history_is_complete_after_crash_in_validation(self):
    root = self.get_temp_dir()
    prep = tiny_prep(root)
    config = TrainConfig(batch_size=64, epochs=3, patience=0, verbose=0,
                         eval_max_users=50)
    tower = TowerConfig(8, (16,), 8, use_amm=False)
    loss = LossConfig(use_cal=False)
    directory = os.path.join(root, "variant")
    real = trainer.FullCorpusValidation.on_epoch_end

    class Crash(Exception):
      pass

    def crash_on_second(self, epoch, logs=None):
      if epoch == 1:
        raise Crash()  # the process dies while validating epoch 2
      return real(self, epoch, logs)

    with mock.patch.object(trainer.FullCorpusValidation, "on_epoch_end",
                           crash_on_second):
      with self.assertRaises(Crash):
        trainer.train_variant("two_tower", prep, tower, loss, config,
                             directory)
    _, result = trainer.train_variant("two_tower", prep, tower, loss, config,
                                     directory)
    self.assertEqual([h["epoch"] for h in result["history"]], [1, 2, 3])


if __name__ == "__main__":
  tf.test.main()


class MixedPrecisionTest(tf.test.TestCase):
  """--precision: the MLPs compute in 16 bits; variables, tower outputs and
  losses stay float32, and the weights load into a float32 build."""

  def _train(self, precision):
    root = self.get_temp_dir()
    prep = tiny_prep(root)
    config = TrainConfig(batch_size=64, epochs=2, patience=0, verbose=0,
                         eval_max_users=50, precision=precision,
                         learning_rate=0.01)
    tower, loss = TowerConfig(8, (16,), 8), LossConfig()
    built, result = trainer.train_variant(
        "dat", prep, tower, loss, config, os.path.join(root, precision))
    return prep, tower, loss, built, result

  def test_mixed_float16_and_bfloat16(self):
    for precision, compute in (("mixed_float16", tf.float16),
                               ("mixed_bfloat16", tf.bfloat16)):
      with self.subTest(precision):
        prep, tower, loss, built, result = self._train(precision)
        dense = [l for l in built.user_tower.mlp.layers
                 if isinstance(l, tf.keras.layers.Dense)]
        self.assertTrue(dense)
        for layer in dense:
          self.assertEqual(layer.compute_dtype, compute.name)
        self.assertEqual(
            {v.dtype for v in built.model.trainable_variables}, {tf.float32})
        scaled = isinstance(built.model.optimizer,
                            tf.keras.mixed_precision.LossScaleOptimizer)
        self.assertEqual(scaled, precision == "mixed_float16")
        batch = pipeline.dummy_batch(prep)
        p_u, a_u = built.user_tower(batch)
        p_v, _, _ = built.encoder(batch["item"])
        self.assertEqual((p_u.dtype, a_u.dtype, p_v.dtype), (tf.float32,) * 3)
        terms = built.model.loss_terms(batch, training=True)
        for name, value in terms.items():
          self.assertEqual(value.dtype, tf.float32, name)
        for entry in result["history"]:
          self.assertTrue(np.isfinite(entry["loss"]), entry)
        # Training moved the loss down and the model ranks above chance.
        history = result["history"]
        self.assertLess(history[-1]["loss"], history[0]["loss"])
        self.assertGreater(result["test"]["recall@20"], 0.0)
        # A float32 build (serving) loads the weights and computes the same
        # embeddings up to 16-bit rounding.
        fresh = pipeline.build(prep, tower, loss)
        pipeline.create_variables(fresh, prep)
        fresh.model.load_weights(os.path.join(
            self.get_temp_dir(), precision, "best", "weights")).expect_partial()
        self.assertAllClose(fresh.user_tower(batch)[0], p_u, atol=0.05)


def _average(optimizer, variable):
  """The optimizer's moving average of `variable` (Keras keeps it private)."""
  # pylint: disable=protected-access
  return optimizer._model_variables_moving_average[
      optimizer._index_dict[optimizer._var_key(variable)]]


class WeightAveragingTest(tf.test.TestCase):
  """--ema_momentum: validation, the best weights and a refit use the
  optimizer's moving average of the weights."""

  def test_averaged_weights_swaps_the_average_in_and_back(self):
    model = tf.keras.Sequential([tf.keras.layers.Dense(2)])
    model.build([None, 3])
    optimizer = trainer.make_optimizer(TrainConfig(learning_rate=0.1,
                                                   ema_momentum=0.5))
    model.compile(optimizer=optimizer)
    variables = model.trainable_variables
    average = [v.numpy() for v in variables]
    for step in range(3):
      grads = [tf.fill(v.shape, float(step + 1)) for v in variables]
      optimizer.apply_gradients(zip(grads, variables))
      average = [0.5 * a + 0.5 * v.numpy() for a, v in zip(average, variables)]
    trained = [v.numpy() for v in variables]
    self.assertNotAllClose(trained[0], average[0])
    with trainer.averaged_weights(model):
      for v, a in zip(variables, average):
        self.assertAllClose(v, a)
    for v, t in zip(variables, trained):
      self.assertAllClose(v, t)

  def test_nothing_changes_when_off_or_before_the_first_step(self):
    for config, steps in ((TrainConfig(ema_momentum=0.0), 2),
                          (TrainConfig(), 0)):
      model = tf.keras.Sequential([tf.keras.layers.Dense(2)])
      model.build([None, 3])
      optimizer = trainer.make_optimizer(config)
      model.compile(optimizer=optimizer)
      for _ in range(steps):
        optimizer.apply_gradients(
            [(tf.ones_like(v), v) for v in model.trainable_variables])
      before = [v.numpy() for v in model.trainable_variables]
      with trainer.averaged_weights(model):
        for v, b in zip(model.trainable_variables, before):
          self.assertAllEqual(v, b)
      trainer.write_average(model)
      for v, b in zip(model.trainable_variables, before):
        self.assertAllEqual(v, b)

  def test_best_weights_are_the_validated_average(self):
    root = self.get_temp_dir()
    prep = tiny_prep(root)
    config = TrainConfig(batch_size=64, epochs=3, patience=0, verbose=0,
                         eval_max_users=50, learning_rate=0.01,
                         ema_momentum=0.9)
    tower, loss = TowerConfig(8, (16,), 8), LossConfig()
    real_evaluate, seen = evaluation.evaluate, []

    def evaluate(score_fn, eval_set, **kwargs):
      # During training: are the model's weights the optimizer's average?
      model = built_models[0].model
      optimizer = model.optimizer
      if optimizer is not None and optimizer.iterations > 0:
        v = model.trainable_variables[0]
        average = _average(optimizer, v)
        seen.append(np.allclose(v.numpy(), average.numpy()))
      return real_evaluate(score_fn, eval_set, **kwargs)

    built_models = []
    real_build = pipeline.build
    with mock.patch.object(
        pipeline, "build",
        side_effect=lambda *a, **k: built_models.append(real_build(*a, **k))
        or built_models[-1]), \
        mock.patch.object(trainer.evaluation, "evaluate", evaluate):
      built, result = trainer.train_variant(
          "dat", prep, tower, loss, config, os.path.join(root, "ema"))
    # Each epoch's validation ran on the average (the test scoring after it
    # may run on an earlier epoch's average: the best weights).
    self.assertEqual(seen[:config.epochs], [True] * config.epochs)
    best = result["history"][result["best_epoch"] - 1]
    # The loaded best weights score on validation what the callback saw.
    again = evaluation.evaluate(
        pipeline.model_scorer(built, len(prep.data.items)), prep.val,
        batch_size=config.eval_batch_size)
    self.assertAllClose(again["recall@20"], best["val_recall@20"])
    self.assertAllClose(again["ndcg@20"], best["val_ndcg@20"])
    # A refit keeps the average, not the last step's weights.
    view = pipeline.refit_view(prep, config)
    refit, _ = trainer.train_variant(
        "dat_refit", view, tower, loss, config,
        os.path.join(root, "ema_refit"), refit_epochs=2)
    optimizer = refit.model.optimizer
    for v in refit.model.trainable_variables:
      average = _average(optimizer, v)
      self.assertAllClose(v, average)
