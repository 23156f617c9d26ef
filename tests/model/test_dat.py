"""Tests for tt_mimic.model.dat: the DAT model's loss terms, its main
loss against NumPy, and fitting under tf.function."""

from absl.testing import parameterized
import numpy as np

import tt_mimic  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from tt_mimic.data import pipeline as data_lib
from tt_mimic.model import dat as model_lib

from tiny_model import build
from tiny_model import train_batch


def _softmax_loss(logits, items, ids, weight=None):
  """The mean over queries of -log softmax of each query's own candidate
  (candidate i for query i), hits of the row's own book elsewhere removed;
  each query's term times its `weight` when given."""
  rows = np.arange(len(items))
  hits = ids[None, :] == items[:, None]
  hits[rows, rows] = False
  logits = np.where(hits, -np.inf, logits)
  top = logits.max(axis=1, keepdims=True)
  log_softmax = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
  weight = np.ones(len(items)) if weight is None else weight
  return -(weight * log_softmax[rows, rows]).mean()


class DATModelTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.product(loss=["softmax", "bce"], use_amm=[True, False],
                         use_cal=[True, False])
  def test_compute_loss_terms(self, loss, use_amm, use_cal):
    prep, built = build(use_amm=use_amm, loss=loss, use_cal=use_cal)
    batch = train_batch(prep)
    model = built.model
    for tracker in model.trackers.values():
      tracker.reset_state()
    with tf.GradientTape() as tape:
      total = model.compute_loss(batch, training=True)
    self.assertEqual(total.shape, ())
    self.assertTrue(np.isfinite(float(total)))
    terms = {}
    for name, tracker in model.trackers.items():
      if name == "regularization_loss":
        continue  # updated by train_step, not compute_loss
      self.assertEqual(float(tracker.count), 1.0, name)  # updated once
      terms[name] = float(tracker.result())
      self.assertTrue(np.isfinite(terms[name]), name)
    self.assertGreater(terms["loss_main"], 0.0)
    if use_amm:
      self.assertGreater(terms["loss_u"], 0.0)
      self.assertGreater(terms["loss_v"], 0.0)
    else:
      self.assertEqual(terms["loss_u"], 0.0)
      self.assertEqual(terms["loss_v"], 0.0)
    if use_cal:
      self.assertGreater(terms["loss_ca"], 0.0)
    else:
      self.assertEqual(terms["loss_ca"], 0.0)
    cfg = model.config
    self.assertAllClose(
        float(total),
        terms["loss_main"] + cfg.lambda_u * terms["loss_u"]
        + cfg.lambda_v * terms["loss_v"] + cfg.lambda_ca * terms["loss_ca"],
        rtol=1e-5)
    self.assertAllClose(terms["loss"], float(total), rtol=1e-6)
    variables = model.trainable_variables
    grads = tape.gradient(total, variables)
    reached = [v.name for v, g in zip(variables, grads) if g is not None]
    self.assertTrue(any("user_mlp" in n or "dense" in n for n in reached))
    for g in grads:
      if g is not None:
        values = g.values if isinstance(g, tf.IndexedSlices) else g
        self.assertTrue(np.all(np.isfinite(values.numpy())))
    self.assertEqual(any("/a_u/" in n for n in reached), use_amm)
    self.assertEqual(any("/a_v/" in n for n in reached), use_amm)

  @parameterized.named_parameters(
      ("mixed_negatives", dict(uniform_negatives=16)),
      ("no_log_q", dict(log_q=False)),
      ("bce_one_negative", dict(loss="bce", bce_negatives=1)))
  def test_loss_options_are_finite(self, kwargs):
    prep, built = build(**kwargs)
    total = built.model.compute_loss(train_batch(prep), training=True)
    self.assertTrue(np.isfinite(float(total)))

  @parameterized.named_parameters(("in_batch", 0), ("whole_corpus", 10**6))
  def test_main_loss_against_numpy(self, uniform_negatives):
    prep, built = build(uniform_negatives=uniform_negatives)
    batch = train_batch(prep, size=64)  # popular books: expected count > 1
    items = batch["item"].numpy()
    n = len(prep.data.items)
    p_u, _ = built.user_tower(batch)
    p_v, _, _ = built.encoder(batch["item"])
    got = float(built.model.main_loss(p_u, p_v, batch["item"], False))
    # By hand: candidates are the batch's positives, then (at or above the
    # corpus size) every corpus item once; log-Q subtracts the log of each
    # candidate's expected count, batch * q (+ 1); hits of the row's own
    # book other than its diagonal are removed.
    ids, cands, extra = items, p_v.numpy(), 0.0
    if uniform_negatives:
      corpus, _, _ = built.encoder(tf.range(1, n + 1))
      ids = np.concatenate([items, np.arange(1, n + 1)])
      cands = np.concatenate([cands, corpus.numpy()])
      extra = 1.0
    logits = p_u.numpy() @ cands.T / built.model.config.temperature
    logits -= np.log(len(items) * prep.item_probability[ids] + extra)
    self.assertAllClose(got, _softmax_loss(logits, items, ids), rtol=1e-4)

  def test_weighted_main_loss(self):
    # --user_weight_power: each query's softmax term times its weight, the
    # sum still divided by the batch size.
    prep, built = build()
    batch = train_batch(prep, size=16)
    items = batch["item"].numpy()
    p_u, _ = built.user_tower(batch)
    p_v, _, _ = built.encoder(batch["item"])
    weight = np.linspace(0.0, 2.0, 16).astype(np.float32)
    got = float(built.model.main_loss(p_u, p_v, batch["item"], False,
                                      weight=tf.constant(weight)))
    logits = p_u.numpy() @ p_v.numpy().T / built.model.config.temperature
    logits -= np.log(len(items) * prep.item_probability[items])
    self.assertAllClose(got, _softmax_loss(logits, items, items, weight),
                        rtol=1e-4)
    self.assertNotAllClose(got, _softmax_loss(logits, items, items),
                           rtol=1e-3)
    # BCE draws its negatives at random; zero weights zero it whatever they
    # are, and the batch's weights reach compute_loss.
    prep, built = build(loss="bce")
    batch = train_batch(prep, size=16)
    p_u, _ = built.user_tower(batch)
    p_v, _, _ = built.encoder(batch["item"])
    self.assertGreater(float(built.model.main_loss(p_u, p_v, batch["item"],
                                                   False)), 0.0)
    self.assertEqual(float(built.model.main_loss(
        p_u, p_v, batch["item"], False, weight=tf.zeros([16]))), 0.0)
    for tracker in built.model.trackers.values():
      tracker.reset_state()
    built.model.compute_loss({**batch, "weight": tf.zeros([16])})
    self.assertEqual(float(built.model.trackers["loss_main"].result()), 0.0)

  @parameterized.parameters("softmax", "bce")
  def test_several_interests(self, loss):
    # The softmax scores a candidate by the user's best interest (TFRS's
    # maxsim); the mimic target and BCE use the interest nearest the
    # example's positive.
    prep, built = build(interests=3, loss=loss)
    batch = train_batch(prep, size=32)
    p_u, _ = built.user_tower(batch)
    p_v, _, _ = built.encoder(batch["item"])
    self.assertEqual(p_u.shape, (32, 3, 8))
    with tf.GradientTape() as tape:
      total = built.model.compute_loss(batch, training=True)
    self.assertTrue(np.isfinite(float(total)))
    grads = tape.gradient(total, built.user_tower.attention.query.kernel)
    self.assertAllGreater(tf.reduce_max(tf.abs(grads), axis=0), 0.0)
    nearest = model_lib.select_interest(p_u, p_v).numpy()
    affinity = np.einsum("bkd,bd->bk", p_u.numpy(), p_v.numpy())
    self.assertAllClose(
        nearest, p_u.numpy()[np.arange(32), affinity.argmax(axis=1)])
    if loss == "bce":
      return
    got = float(built.model.main_loss(p_u, p_v, batch["item"], False))
    items = batch["item"].numpy()
    logits = (np.einsum("bkd,nd->bkn", p_u.numpy(), p_v.numpy()).max(axis=1)
              / built.model.config.temperature)
    logits -= np.log(len(items) * prep.item_probability[items])
    self.assertAllClose(got, _softmax_loss(logits, items, items), rtol=1e-4)

  def test_fit_one_epoch_under_tf_function(self):
    prep, built = build()
    built.model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    ds = data_lib.train_dataset(prep.sequence, prep.user_id_index,
                                prep.feature_config.history_length, 64, 0)
    history = built.model.fit(ds.take(5), epochs=1, verbose=0)
    for name in ("loss_main", "loss_u", "loss_v", "loss_ca"):
      self.assertIn(name, history.history)
      self.assertTrue(np.isfinite(history.history[name][0]), name)


if __name__ == "__main__":
  tf.test.main()
