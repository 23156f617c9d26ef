"""Tests for tt_mimic.training.optimizers: LazyAdam touches only a batch's
rows; CatchUpAdam touches only a batch's rows and still follows dense
Adam's path (weights, moments and weight average)."""
# pylint: disable=protected-access  (the optimizers' slots and row steps)

import os

from absl.testing import parameterized
import numpy as np

import tt_mimic  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from tt_mimic.config import LossConfig
from tt_mimic.config import TowerConfig
from tt_mimic.config import TrainConfig
from tt_mimic.training import optimizers
from tt_mimic.training import trainer

from test_trainer import _average
from test_trainer import tiny_prep


def _sparse(rows, values, shape):
  return tf.IndexedSlices(tf.constant(values, tf.float32),
                          tf.constant(rows, tf.int64), tf.constant(shape))


class LazyAdamTest(tf.test.TestCase):

  def test_sparse_updates_touch_only_the_batch_rows(self):
    table = tf.Variable(tf.ones([5, 3]))
    dense = tf.Variable(tf.ones([3]))
    lazy = optimizers.LazyAdam(0.1)
    plain = tf.keras.optimizers.Adam(0.1)
    table2, dense2 = tf.Variable(tf.ones([5, 3])), tf.Variable(tf.ones([3]))
    for rows in ([0, 2], [2, 2]):  # the second batch repeats a row
      grads = tf.IndexedSlices(tf.ones([2, 3]), tf.constant(rows),
                               tf.constant([5, 3]))
      lazy.apply_gradients([(grads, table), (tf.ones([3]), dense)])
      plain.apply_gradients([(grads, table2), (tf.ones([3]), dense2)])
    # Rows never in a batch keep their weights.
    self.assertAllEqual(table.numpy()[[1, 3, 4]], np.ones([3, 3]))
    # Dense variables get plain Adam.
    self.assertAllClose(dense, dense2)
    # Row 0, touched once at step 1, moved by exactly one Adam step: lr.
    self.assertAllClose(table.numpy()[0], np.full(3, 0.9), atol=1e-4)
    self.assertTrue(np.all(table.numpy()[2] < table.numpy()[0]))


class CatchUpAdamTest(tf.test.TestCase, parameterized.TestCase):

  def _run(self, optimizer, start, steps=40, seed=0):
    """`steps` sparse updates of a [8, 3] table (2-3 random rows, random
    gradients, so most rows skip steps between touches) and dense updates
    of a [2, 3] kernel (rank 2 like a table), from step `start` on."""
    rng = np.random.default_rng(seed)
    table = tf.Variable(rng.normal(size=[8, 3]).astype(np.float32))
    kernel = tf.Variable(np.zeros([2, 3], np.float32))
    optimizer.build([table, kernel])
    optimizer.iterations.assign(start)
    for _ in range(steps):
      rows = rng.choice(8, size=rng.integers(2, 4), replace=False)
      grads = _sparse(rows, rng.normal(size=[len(rows), 3]), [8, 3])
      optimizer.apply_gradients([(grads, table),
                                 (tf.constant(rng.normal(size=[2, 3]),
                                              tf.float32), kernel)])
    return table, kernel

  @parameterized.parameters(
      # No weight averaging, a short one, the default; each from the first
      # step (where Adam's bias correction changes alpha within a gap) and
      # from step 5000 (where it has settled).
      *[{"mu": mu, "start": start}
        for mu in (0.0, 0.5, 0.99) for start in (0, 5000)],
      # beta_1 / sqrt(beta_2) = mu: the average's other branch.
      {"mu": 0.9, "start": 5000, "beta_1": 0.9 * 0.999 ** 0.5})
  def test_follows_dense_adam(self, mu, start, beta_1=0.9):
    ema = {"use_ema": mu > 0, "ema_momentum": mu or 0.99}
    dense = tf.keras.optimizers.Adam(0.01, beta_1=beta_1, **ema)
    catchup = optimizers.CatchUpAdam(0.01, beta_1=beta_1, **ema)
    lazy = optimizers.LazyAdam(0.01, beta_1=beta_1, **ema)
    want, want_kernel = self._run(dense, start)
    got, got_kernel = self._run(catchup, start)
    lazy_table, _ = self._run(lazy, start)
    # Before the catch-up, rows whose last touch was not the last step
    # still lack their pending steps.
    self.assertNotAllClose(got, want, rtol=1e-3, atol=1e-5)
    catchup.catch_up([got, got_kernel])
    # From the first step Adam's alpha changes within a gap, which the
    # catch-up's one alpha per gap approximates; at step 5000 it has
    # settled. (Measured: 1.5e-3 and 4.4e-6 at most; the weights are O(1).)
    tolerance = {0: {"rtol": 0, "atol": 3e-3},
                 5000: {"rtol": 0, "atol": 2e-5}}[start]
    self.assertAllClose(got, want, **tolerance)
    # A rank-2 variable with dense gradients: Keras' Adam, untouched by
    # the catch-up.
    self.assertAllClose(got_kernel, want_kernel, rtol=1e-5, atol=1e-7)
    # The moments involve no alpha.
    for name in ("_momentums", "_velocities"):
      self.assertAllClose(getattr(catchup, name)[0], getattr(dense, name)[0],
                          rtol=1e-4, atol=1e-8)
    if mu:
      self.assertAllClose(_average(catchup, got), _average(dense, want),
                          **tolerance)
      self.assertAllClose(_average(catchup, got_kernel),
                          _average(dense, want_kernel), rtol=1e-5, atol=1e-7)
    # LazyAdam, which drops the steps between touches, is ten times as far
    # off and more (measured: 0.07 and 0.40).
    self.assertNotAllClose(lazy_table, want, rtol=0, atol=0.03)

  def test_follows_a_learning_rate_schedule(self):
    """A row touched once, then 3000 steps without it under a cosine decay:
    its tail takes the rates of the steps it spans, not the rate at the
    catch-up (about a quarter of them here)."""
    def run(cls):
      table = tf.Variable(tf.ones([2, 3]))
      optimizer = cls(tf.keras.optimizers.schedules.CosineDecay(0.01, 10000),
                      use_ema=True, ema_momentum=0.99)
      optimizer.build([table])
      optimizer.iterations.assign(5000)
      step = tf.function(lambda row: optimizer.apply_gradients(
          [(tf.IndexedSlices(tf.ones([1, 3]), row, tf.constant([2, 3])),
            table)]))
      step(tf.constant([0]))
      for _ in range(3000):
        step(tf.constant([1]))
      if cls is optimizers.CatchUpAdam:
        optimizer.catch_up([table])
      return table.numpy()[0], _average(optimizer, table).numpy()[0]
    (want, want_average), (got, got_average) = (
        run(tf.keras.optimizers.Adam), run(optimizers.CatchUpAdam))
    self.assertAllClose(got, want, rtol=0, atol=1e-4)
    self.assertAllClose(got_average, want_average, rtol=0, atol=1e-4)
    self.assertGreater(np.min(1 - want), 0.1)  # the row moved

  def test_state_survives_a_checkpoint_mid_gap(self):
    """Restored in a fresh optimizer while rows are pending, training goes
    on as if never interrupted."""
    def steps(optimizer, table, rows_list):
      for rows in rows_list:
        optimizer.apply_gradients([(_sparse(rows, np.ones([len(rows), 3]),
                                            [6, 3]), table)])
    first, then = ([0, 1], [1], [2]), ([1], [3], [0, 4])
    table = tf.Variable(tf.ones([6, 3]))
    optimizer = optimizers.CatchUpAdam(0.1, use_ema=True, ema_momentum=0.9)
    optimizer.build([table])
    steps(optimizer, table, first)
    path = tf.train.Checkpoint(optimizer=optimizer, table=table).save(
        os.path.join(self.get_temp_dir(), "ckpt"))
    steps(optimizer, table, then)
    optimizer.catch_up([table])
    fresh_table = tf.Variable(tf.zeros([6, 3]))
    fresh = optimizers.CatchUpAdam(0.1, use_ema=True, ema_momentum=0.9)
    fresh.build([fresh_table])
    tf.train.Checkpoint(optimizer=fresh, table=fresh_table).restore(
        path).assert_consumed()
    steps(fresh, fresh_table, then)
    fresh.catch_up([fresh_table])
    self.assertAllClose(fresh_table, table, rtol=1e-6, atol=1e-7)
    self.assertAllClose(_average(fresh, fresh_table),
                        _average(optimizer, table),
                        rtol=1e-6, atol=1e-7)

  def test_refuses_what_it_cannot_follow(self):
    for kwargs in ({"amsgrad": True}, {"weight_decay": 0.01},
                   {"ema_overwrite_frequency": 10, "use_ema": True},
                   {"beta_1": 0.9, "beta_2": 0.81}):
      with self.subTest(**kwargs), self.assertRaises(ValueError):
        optimizers.CatchUpAdam(0.01, **kwargs)
    with self.assertRaisesRegex(ValueError, "mixed_float16"):
      TrainConfig(optimizer="catchup_adam", precision="mixed_float16")

  def test_a_step_touches_only_the_batch_rows(self):
    optimizer = optimizers.CatchUpAdam(0.1, use_ema=True, ema_momentum=0.9)
    table = tf.Variable(tf.ones([5, 3]))
    optimizer.build([table])
    optimizer.apply_gradients([(_sparse([0, 2], np.ones([2, 3]), [5, 3]),
                                table)])
    after_first = table.numpy()
    moments = optimizer._momentums[0].numpy()
    optimizer.apply_gradients([(_sparse([2], np.ones([1, 3]), [5, 3]),
                                table)])
    # Row 0 was not in the second batch: weights and moments unchanged
    # (dense Adam would have moved them), and never-touched rows too.
    self.assertAllEqual(table.numpy()[[0, 1, 3, 4]],
                        after_first[[0, 1, 3, 4]])
    self.assertAllEqual(optimizer._momentums[0].numpy()[0], moments[0])
    # Its pending step arrives with the catch-up; untouched rows stay.
    optimizer.catch_up([table])
    self.assertTrue(np.all(table.numpy()[0] < after_first[0]))
    self.assertAllEqual(table.numpy()[[1, 3, 4]], np.ones([3, 3]))
    # A second catch-up at the same step changes nothing.
    caught = table.numpy()
    optimizer.catch_up([table])
    self.assertAllEqual(table.numpy(), caught)

  def test_validation_reads_caught_up_averaged_weights(self):
    """trainer.averaged_weights: with catchup_adam the validated weights are
    dense Adam's average, and the trained weights come back after."""
    def model_and_optimizer(name):
      model = tf.keras.Sequential([tf.keras.layers.Embedding(6, 2)])
      model.build([None, 1])
      model.set_weights([np.arange(12, dtype=np.float32).reshape(6, 2)])
      optimizer = trainer.make_optimizer(
          TrainConfig(optimizer=name, learning_rate=0.1, ema_momentum=0.8))
      model.compile(optimizer=optimizer)
      return model, optimizer
    (want, dense), (got, catchup) = (model_and_optimizer("adam"),
                                     model_and_optimizer("catchup_adam"))
    for rows in ([0, 1], [1], [3], [1, 5]):
      for model, optimizer in ((want, dense), (got, catchup)):
        optimizer.apply_gradients([(_sparse(rows, np.ones([len(rows), 2]),
                                            [6, 2]),
                                    model.trainable_variables[0])])
    with trainer.averaged_weights(want):
      expected = want.get_weights()[0]
    # Adam's first steps, where its alpha changes fastest: the catch-up is
    # within 0.01 (measured 0.0033) of dense Adam; the average and the
    # trained weights are 0.2 apart.
    with trainer.averaged_weights(got):
      self.assertAllClose(got.get_weights()[0], expected, rtol=0, atol=0.01)
    self.assertAllClose(got.get_weights()[0], want.get_weights()[0],
                        rtol=0, atol=0.01)
    self.assertNotAllClose(got.get_weights()[0], expected, rtol=0, atol=0.1)

  def test_trains_a_variant(self):
    root = self.get_temp_dir()
    prep = tiny_prep(root)
    config = TrainConfig(batch_size=64, epochs=2, patience=0, verbose=0,
                         eval_max_users=50, learning_rate=0.01,
                         optimizer="catchup_adam")
    built, result = trainer.train_variant(
        "dat", prep, TowerConfig(8, (16,), 8), LossConfig(), config,
        os.path.join(root, "catchup"))
    self.assertIsInstance(built.model.optimizer, optimizers.CatchUpAdam)
    history = result["history"]
    self.assertLess(history[-1]["loss"], history[0]["loss"])
    self.assertGreater(result["test"]["recall@20"], 0.0)
    # Every row of every table is caught up to the last step.
    optimizer = built.model.optimizer
    steps = int(optimizer.iterations.numpy())
    for last in optimizer._last_steps.values():
      touched = last.numpy()[last.numpy() > 0]
      self.assertTrue(np.all(touched == steps))
    # ... and the tables were updated row-wise.
    self.assertTrue(optimizer._sparse_keys)
    self.assertTrue(any(np.any(last.numpy() > 0)
                        for last in optimizer._last_steps.values()))


if __name__ == "__main__":
  tf.test.main()
