"""Tests for the towers, the item preprocessing, the DAT model and export."""

import atexit
import dataclasses
import os
import shutil
import tempfile

from absl.testing import parameterized
import numpy as np
import pandas as pd
import pytest

import tt_mimic  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from tt_mimic.data import pipeline as data_lib
from tt_mimic.serving import export
from tt_mimic.data import features
from tt_mimic.model import dat as model_lib
from tt_mimic.training import pipeline as runner
from tt_mimic.model import towers

import model_fixture

TOWER = towers.TowerConfig(embedding_dim=8, hidden_units=(16,), output_dim=8)
NUMERIC_WIDTH = 2 * len(features.NUMERIC_COLUMNS)

_SHARED = {}


def shared_prep() -> runner.Prepared:
  """One prepared tiny dataset per process (built on first use)."""
  if "prep" not in _SHARED:
    directory = tempfile.mkdtemp(prefix="tt_mimic_towers_")
    atexit.register(shutil.rmtree, directory, True)
    _SHARED["prep"] = model_fixture.prepared(directory)
  return _SHARED["prep"]


def build(use_amm=True, loss="softmax", use_cal=True, **loss_kwargs):
  prep = shared_prep()
  built = runner.build(
      prep, dataclasses.replace(TOWER, use_amm=use_amm),
      model_lib.LossConfig(loss=loss, use_cal=use_cal,
                           **loss_kwargs))
  built.model.compute_loss(runner.dummy_batch(prep))  # creates variables
  return prep, built


def user_tower(prep, built, **config) -> towers.UserTower:
  """A fresh user tower with TOWER's sizes changed by `config`, on `built`'s
  item table."""
  sizes = prep.vocab.sizes()
  return towers.UserTower(
      sizes, dataclasses.replace(TOWER, **config), built.user_tower.table,
      towers.ItemFeatureEmbedding(sizes, TOWER.embedding_dim))


def train_batch(prep, size=48):
  ds = data_lib.train_dataset(prep.sequence, prep.user_id_index,
                              prep.feature_config.history_length, size, seed=3)
  return next(iter(ds))


def raw_books(**columns) -> dict:
  """A raw ItemPreprocessor input dict of tensors."""
  out = {k: tf.constant(v) for k, v in columns.items()}
  for k in features.NUMERIC_COLUMNS:
    out[k] = tf.constant(columns[k], tf.float32)
  return out


class NormMixin:

  def assertUnitNorm(self, x, dim=TOWER.output_dim):
    x = np.asarray(x)
    self.assertEqual(x.shape[-1], dim)
    self.assertTrue(np.all(np.isfinite(x)), x)
    self.assertAllClose(np.linalg.norm(x, axis=-1), np.ones(x.shape[0]),
                        atol=1e-5)


class MaskedMeanTest(tf.test.TestCase):

  def test_mean_over_non_padding(self):
    # Row 0: ids [1, 0, 2] -> mean of [1, 2] and [5, 6] = [3, 4].
    # Row 1: all padding -> zeros, not NaN.
    embedded = tf.constant([[[1., 2.], [3., 4.], [5., 6.]],
                            [[7., 8.], [9., 9.], [1., 1.]]])
    ids = tf.constant([[1, 0, 2], [0, 0, 0]])
    self.assertAllClose(towers.masked_mean(embedded, ids),
                        [[3., 4.], [0., 0.]])


class TowerTest(tf.test.TestCase, parameterized.TestCase, NormMixin):

  @parameterized.parameters(True, False)
  def test_outputs_are_unit_norm(self, use_amm):
    prep, built = build(use_amm=use_amm)
    n = len(prep.data.items)
    p_v, a_v, category = built.encoder(tf.range(1, n + 1))
    self.assertEqual(p_v.shape, (n, TOWER.output_dim))
    self.assertUnitNorm(p_v)
    self.assertEqual(category.shape, (n,))
    batch = {"user_id": tf.constant(prep.val.user_id[:17]),
             "history": tf.constant(prep.val.history[:17])}
    p_u, a_u = built.user_tower(batch)
    self.assertEqual(p_u.shape, (17, TOWER.output_dim))
    self.assertUnitNorm(p_u)
    if use_amm:
      self.assertEqual(a_u.shape, (17, TOWER.output_dim))
      self.assertEqual(a_v.shape, (n, TOWER.output_dim))
    else:
      self.assertIsNone(a_u)
      self.assertIsNone(a_v)

  def test_without_amm_there_are_no_augmented_vectors(self):
    _, built = build(use_amm=False)
    self.assertIsNone(built.user_tower.augmented)
    self.assertIsNone(built.item_tower.augmented)
    names = [v.name for v in built.model.variables]
    self.assertFalse([n for n in names if "/a_u/" in n or "/a_v/" in n], names)
    _, with_amm = build(use_amm=True)
    names = [v.name for v in with_amm.model.trainable_variables]
    self.assertLen([n for n in names if "/a_u/" in n], 1)
    self.assertLen([n for n in names if "/a_v/" in n], 1)

  def test_unknown_users_and_empty_history(self):
    prep, built = build()
    h = prep.feature_config.history_length
    known = int(prep.val.user_id[0])
    hist = prep.val.history[0]
    batch = {"user_id": tf.constant([0, 0, known, known], tf.int64),
             "history": tf.constant(np.stack([np.zeros(h, np.int64), hist,
                                              np.zeros(h, np.int64), hist]))}
    p_u, _ = built.user_tower(batch)
    self.assertUnitNorm(p_u)
    # Training mode with the user id always dropped.
    tower = user_tower(prep, built, user_id_dropout=1.0)
    p_dropped, a_dropped = tower(batch, training=True)
    self.assertUnitNorm(p_dropped)
    # The id is hidden from the tower's input (rows 2, 3 score like unknown
    # users 0, 1), but a_u stays the user's own, for the mimic loss.
    self.assertAllClose(p_dropped[2:], tower(batch)[0][:2], atol=1e-6)
    own = tower.augmented(tf.constant([0, 0, known, known]))
    self.assertAllClose(a_dropped, own)
    self.assertGreater(float(tf.reduce_max(tf.abs(own[2] - own[0]))), 1e-4)

  def test_history_dropout_hides_the_whole_history_in_training(self):
    prep, built = build()
    hist = next(h for h in prep.val.history if np.count_nonzero(h) >= 2)
    user = int(prep.val.user_id[0])
    batch = {"user_id": tf.constant([user, user], tf.int64),
             "history": tf.constant(np.stack([hist, np.zeros_like(hist)]))}
    tower = user_tower(prep, built, history_dropout=1.0, user_id_dropout=0.0)
    p_u, _ = tower(batch)  # inference: the history counts
    self.assertGreater(float(tf.reduce_max(tf.abs(p_u[0] - p_u[1]))), 1e-4)
    p_u, _ = tower(batch, training=True)
    self.assertUnitNorm(p_u)
    self.assertAllClose(p_u[0], p_u[1], atol=1e-6)

  def test_without_user_id_embedding_a_user_is_their_history(self):
    prep, built = build()
    hist = prep.val.history[0]
    users = [int(prep.val.user_id[0]), int(prep.val.user_id[1])]
    batch = {"user_id": tf.constant(users, tf.int64),
             "history": tf.constant(np.stack([hist, hist]))}
    plain = user_tower(prep, built, user_id_embedding=False, use_amm=False)
    p_u, _ = plain(batch)
    self.assertUnitNorm(p_u)
    self.assertIsNone(plain.user_id)
    self.assertNotIn("user_id", [v.name.split("/")[-2]
                                 for v in plain.trainable_variables])
    self.assertAllClose(p_u[0], p_u[1], atol=1e-6)
    # Under AMM the per-user a_u still tells the two users apart.
    p_u, _ = user_tower(prep, built, user_id_embedding=False)(batch)
    self.assertGreater(float(tf.reduce_max(tf.abs(p_u[0] - p_u[1]))), 1e-4)

  def test_history_dedupe_gives_the_same_features(self):
    prep, built = build()
    history = tf.constant(prep.val.history[:9])  # repeats and padding
    embed = built.user_tower.embed_books
    self.assertAllClose(towers.embed_history(embed, history, dedupe=True),
                        towers.embed_history(embed, history, dedupe=False),
                        atol=1e-6)

  def test_recent_pool_makes_history_order_matter(self):
    prep, built = build()
    hist = next(h for h in prep.val.history if np.count_nonzero(h) >= 4)
    n = np.count_nonzero(hist)
    reordered = hist.copy()
    reordered[:n] = hist[:n][::-1]  # same books, oldest first
    batch = {"user_id": tf.zeros([2], tf.int64),
             "history": tf.constant(np.stack([hist, reordered]))}
    # The whole-history mean ignores order...
    p_u, _ = built.user_tower(batch)
    self.assertAllClose(p_u[0], p_u[1], atol=1e-6)
    # ...the recent pool does not.
    tower = user_tower(prep, built, recent_length=2)
    p_u, _ = tower(batch)
    self.assertUnitNorm(p_u)
    self.assertGreater(float(tf.reduce_max(tf.abs(p_u[0] - p_u[1]))), 1e-4)

  def test_all_empty_item_features(self):
    _, built = build()
    c = shared_prep().feature_config
    empty = {"id": tf.zeros([2], tf.int64), "author": tf.zeros([2], tf.int64),
             "categories": tf.zeros([2, c.max_categories], tf.int64),
             "title": tf.zeros([2, c.title_length], tf.int64),
             "numeric": tf.constant([[0., 0., 0., 1., 1., 1.]] * 2)}
    p_v, _ = built.item_tower(empty)
    self.assertUnitNorm(p_v)

  def test_unknown_books_through_the_preprocessor(self):
    prep, built = build()
    known = prep.data.items.iloc[0]
    raw = raw_books(
        parent_asin=["NOT_A_BOOK", "", known["parent_asin"], "X2"],
        title=["", "zzqx unknownword", known["title"], "!!!"],
        author=["Unknown", "", "Some New Author", known["author"]],
        categories=[["", ""], ["", ""],
                    ["Mystery, Thriller & Suspense", "Nonexistent > Path"],
                    ["Children's Books", ""]],
        average_rating=[np.nan] * 4, rating_number=[np.nan, -1., np.inf, 3.],
        price=[np.nan] * 4)
    x = prep.preprocessor(raw)
    self.assertAllEqual(x["item"], [0, 0, 1, 0])
    self.assertAllEqual(x["author"][:2], [1, 0])  # "Unknown" is just rare
    self.assertAllEqual(x["categories"][0], [0] * prep.feature_config
                        .max_categories)
    self.assertAllEqual(x["title"][0], [0] * prep.feature_config.title_length)
    self.assertAllEqual(x["cal_category"][:2], [0, 0])
    x["id"] = tf.gather(prep.item_table["id"], x.pop("item"))
    p_v, _ = built.item_tower(x)
    self.assertUnitNorm(p_v)


class TowerMimicGradientTest(tf.test.TestCase):
  """Stop-gradient of the mimic losses on the real towers."""

  def test_mimic_losses_only_train_their_augmented_vectors(self):
    prep, built = build()
    batch = train_batch(prep)
    a_u_var = built.user_tower.augmented.embeddings
    a_v_var = built.item_tower.augmented.embeddings
    variables = built.model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
      p_u, a_u = built.user_tower(batch, training=True)
      p_v, a_v, _ = built.encoder(batch["item"], training=True)
      loss_u = model_lib.losses.mimic_loss(a_u, p_v)
      loss_v = model_lib.losses.mimic_loss(a_v, p_u)
      main = built.model.main_loss(p_u, p_v, batch["item"], True)
    for loss, owner in ((loss_u, a_u_var), (loss_v, a_v_var)):
      grads = tape.gradient(loss, variables)
      reached = [v.name for v, g in zip(variables, grads) if g is not None]
      self.assertEqual(reached, [owner.name])
    grads = dict(zip([v.name for v in variables],
                     tape.gradient(main, variables)))
    self.assertIsNotNone(grads[a_u_var.name])
    self.assertIsNotNone(grads[a_v_var.name])


class ItemPreprocessorTest(tf.test.TestCase):

  CONFIG = features.FeatureConfig(title_length=4, max_categories=3)

  def items(self):
    # average_rating: training books (train_count > 0) have 4, 2 and NaN ->
    #   mean 3, variance 1.
    # rating_number (log1p): training values 0, 99, 9 -> 0, 2 ln10, ln10;
    #   mean ln10, variance (ln10^2 + ln10^2 + 0) / 3 = 2/3 ln10^2.
    # price: missing for every book -> mean 0, variance 1.
    return pd.DataFrame({
        "parent_asin": ["A", "B", "C", "D"],
        "title": ["Night Case", "Star", "", "Night"],
        "author": ["Ann", "Bob", "", "Ann"],
        "categories": [["Books", "Mystery", "Thrillers"], ["Books", "SF"], [],
                       ["Books", "Mystery"]],
        "average_rating": [4.0, 2.0, np.nan, 3.0],
        "rating_number": [0.0, 99.0, 9.0, 5.0],
        "price": [np.nan] * 4,
        "train_count": [3, 2, 1, 0]})

  def test_numeric_stats(self):
    means, variances = features.numeric_stats(self.items())
    ln10 = np.log(10.0)
    self.assertAllClose(means, [3.0, ln10, 0.0])
    self.assertAllClose(variances, [1.0, 2.0 / 3.0 * ln10 ** 2, 1.0])
    self.assertEqual(means.dtype, np.float32)

  def test_numeric_stats_single_value_and_constant_columns(self):
    items = self.items().assign(average_rating=[4.0, np.nan, np.nan, np.nan],
                                rating_number=[5.0, 5.0, 5.0, 1.0])
    means, variances = features.numeric_stats(items)
    self.assertAllClose(means, [4.0, np.log(6.0), 0.0])
    self.assertAllClose(variances, [1.0, 1.0, 1.0])

  def preprocessor(self, items):
    means, variances = features.numeric_stats(items)
    return features.ItemPreprocessor(
        ["A", "B", "C", "D"], ["Ann"], ["Mystery", "Mystery > Thrillers", "SF"],
        ["Mystery", "SF"], ["night", "case", "star"], means, variances,
        self.CONFIG)

  def test_numerics_missing_flags_and_normalization(self):
    p = self.preprocessor(self.items())
    raw = raw_books(
        parent_asin=["A", "Z", "D"], title=["Night, CASE!", "", "moon star"],
        author=["Ann", "Zed", ""],
        categories=[["Mystery", "Mystery > Thrillers"], ["", ""], ["SF", ""]],
        average_rating=[5.0, np.nan, -2.0],
        rating_number=[999.0, np.nan, np.inf],
        price=[7.0, np.nan, np.nan])
    x = p(raw)
    # Row 0: (5 - 3) / 1 = 2; (ln 1000 - ln10) / sqrt(2/3 ln10^2) = sqrt(6);
    #   price (ln 8 - 0) / 1 = ln 8 (a value never seen in training).
    # Rows 1, 2: NaN, negative and infinite are missing -> 0, flag 1.
    self.assertAllClose(x["numeric"], [
        [2.0, np.sqrt(6.0), np.log(8.0), 0, 0, 0],
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1]], atol=1e-5)
    self.assertAllEqual(x["item"], [1, 0, 4])
    self.assertAllEqual(x["author"], [2, 1, 0])
    self.assertAllEqual(x["categories"], [[2, 3, 0], [0, 0, 0], [4, 0, 0]])
    self.assertAllEqual(x["cal_category"], [1, 0, 2])
    self.assertAllEqual(x["title"], [[2, 3, 0, 0], [0, 0, 0, 0],
                                     [1, 4, 0, 0]])

  def test_all_missing_numerics_in_the_item_table(self):
    items = self.items().assign(average_rating=np.nan, rating_number=np.nan)
    means, variances = features.numeric_stats(items)
    self.assertAllEqual(means, [0.0, 0.0, 0.0])
    self.assertAllEqual(variances, [1.0, 1.0, 1.0])
    table = features.build_item_table(items, self.preprocessor(items),
                                      self.CONFIG)
    numeric = table["numeric"]
    self.assertEqual(numeric.shape, (5, NUMERIC_WIDTH))
    self.assertTrue(np.all(np.isfinite(numeric)))
    self.assertAllEqual(numeric[0], np.zeros(NUMERIC_WIDTH))  # padding row
    self.assertAllEqual(numeric[1:], np.tile([0, 0, 0, 1, 1, 1], (4, 1)))
    # Only books seen in training keep an item-id embedding.
    self.assertAllEqual(table["id"], [0, 1, 2, 3, 0])

  def test_empty_numeric_columns_through_ingest(self):
    directory = self.get_temp_dir()
    prep = model_fixture.prepared(directory, empty_numerics=True)
    self.assertAllEqual(prep.vocab.means, [0, 0, 0])
    self.assertAllEqual(prep.vocab.variances, [1, 1, 1])
    numeric = prep.item_table["numeric"][1:]
    self.assertAllEqual(numeric, np.tile([0, 0, 0, 1, 1, 1],
                                         (len(numeric), 1)))

  def test_unseen_top_category_maps_to_zero(self):
    p = self.preprocessor(self.items())
    raw = raw_books(parent_asin=["A"], title=["x"], author=["Ann"],
                    categories=[["Poetry", "Poetry > Haiku"]],
                    average_rating=[1.0], rating_number=[1.0], price=[1.0])
    self.assertAllEqual(p(raw)["cal_category"], [0])

  def test_item_table_with_category_only_outside_training(self):
    items = self.items()
    items.at[3, "categories"] = ["Books", "Poetry"]  # train_count 0
    vocab_items = items.copy()
    means, variances = features.numeric_stats(items)
    tops = features._top_k(
        pd.Series([features.top_category(c) for c in items["categories"]]),
        items["train_count"].to_numpy(), 0)
    self.assertNotIn("Poetry", tops)
    p = features.ItemPreprocessor(
        vocab_items["parent_asin"], ["Ann"], ["Mystery", "SF", "Poetry"],
        tops, ["night"], means, variances, self.CONFIG)
    table = features.build_item_table(items, p, self.CONFIG)
    self.assertEqual(table["cal_category"][4], 0)


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
    rows = np.arange(len(items))
    hits = ids[None, :] == items[:, None]
    hits[rows, rows] = False
    logits[hits] = -np.inf
    top = logits.max(axis=1, keepdims=True)
    log_softmax = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    self.assertAllClose(got, -log_softmax[rows, rows].mean(), rtol=1e-4)

  def test_fit_one_epoch_under_tf_function(self):
    prep, built = build()
    built.model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    ds = data_lib.train_dataset(prep.sequence, prep.user_id_index,
                                prep.feature_config.history_length, 64, 0)
    history = built.model.fit(ds.take(5), epochs=1, verbose=0)
    for name in ("loss_main", "loss_u", "loss_v", "loss_ca"):
      self.assertIn(name, history.history)
      self.assertTrue(np.isfinite(history.history[name][0]), name)


class ExportRoundTripTest(tf.test.TestCase, NormMixin):

  def test_query_and_candidate_modules_survive_save_and_load(self):
    prep, built = build()
    data = prep.data
    history = export.user_histories(data.events, len(data.users),
                                    prep.feature_config.history_length)
    query = export.QueryModule(built.user_tower, data.users,
                               data.items["parent_asin"], prep.user_id_index,
                               history)
    candidate = export.CandidateModule(prep.preprocessor, built.item_tower,
                                       prep.item_table["id"])
    users = tf.constant([str(u) for u in data.users[:5]] + ["NEW_USER", ""])
    hist = tf.constant([[data.items["parent_asin"].iloc[3], "", "NOPE"]] * 7)
    books = data.items.iloc[:6]
    raw = features.raw_item_features(books, prep.feature_config)
    # The candidate module agrees with the training-time item encoder.
    direct, _, _ = built.encoder(tf.range(1, 7))
    self.assertAllClose(
        candidate.serving_default(
            **{k: tf.constant(v) for k, v in raw.items()})["embedding"],
        direct, atol=1e-5)
    raw["parent_asin"][-1] = "UNSEEN_BOOK"
    raw["price"][:] = np.nan
    raw_tensors = {k: tf.constant(v) for k, v in raw.items()}

    before_q = query.serving_default(users)
    before_h = query.with_history(users, hist)
    before_c = candidate.serving_default(**raw_tensors)
    self.assertUnitNorm(before_q["embedding"])
    self.assertUnitNorm(before_h["embedding"])
    self.assertUnitNorm(before_c["embedding"])
    self.assertAllEqual(before_q["known"], [True] * 5 + [False] * 2)
    self.assertAllEqual(before_h["known"], [True] * 7)

    directory = self.get_temp_dir()
    for name, module in (("query", query), ("candidate", candidate)):
      export._save(module, os.path.join(directory, name))
    loaded_q = tf.saved_model.load(os.path.join(directory, "query"))
    loaded_c = tf.saved_model.load(os.path.join(directory, "candidate"))
    after_q = loaded_q.serving_default(users)
    after_h = loaded_q.with_history(users, hist)
    after_c = loaded_c.serving_default(**raw_tensors)
    sig = loaded_q.signatures["serving_default"](user_id=users)
    for before, after in ((before_q, after_q), (before_h, after_h),
                          (before_q, sig)):
      self.assertAllClose(before["embedding"], after["embedding"], atol=1e-6)
      self.assertAllEqual(before["known"], after["known"])
    self.assertAllClose(before_c["embedding"], after_c["embedding"], atol=1e-6)
    sig_c = loaded_c.signatures["serving_default"](**raw_tensors)
    self.assertAllClose(before_c["embedding"], sig_c["embedding"], atol=1e-6)

  def test_query_module_without_history(self):
    # --history_length=0 (the DAT paper's towers): histories are ignored, so
    # an unknown user with one stays unknown (popularity at the index).
    prep, built = build()
    data = prep.data
    query = export.QueryModule(
        built.user_tower, data.users, data.items["parent_asin"],
        prep.user_id_index, np.zeros((len(data.users) + 1, 0), np.int64))
    users = tf.constant([str(data.users[0]), "NEW_USER"])
    hist = tf.constant([[data.items["parent_asin"].iloc[3]]] * 2)
    out = query.with_history(users, hist)
    self.assertUnitNorm(out["embedding"])
    self.assertAllEqual(out["known"], [True, False])
    self.assertAllClose(out["embedding"],
                        query.serving_default(users)["embedding"], atol=1e-6)


if __name__ == "__main__":
  tf.test.main()


def test_books_without_any_category_build_valid_layers(tmp_path):
  """A dump whose books are all ["Books"] (no sub-category) must not crash."""
  import model_fixture  # pylint: disable=g-import-not-at-top
  dataset = model_fixture.write_dataset(tmp_path)
  books = dataset.books.assign(categories='["Books"]', title='[""]')
  books.to_csv(dataset.books_csv, index=False)
  from tt_mimic.data import features, ingest  # pylint: disable=g-import-not-at-top
  from tt_mimic.training import pipeline as runner  # pylint: disable=g-import-not-at-top
  prep = runner.prepare(
      ingest.run(model_fixture.ingest_config(dataset)),
      features.FeatureConfig(title_length=6, history_length=5),
      runner.TrainConfig(batch_size=64, epochs=1, eval_max_users=100))
  assert prep.vocab.categories == [] and prep.vocab.top_categories == []
  assert (prep.item_table["categories"] == 0).all()
  assert (prep.item_table["cal_category"] == 0).all()
