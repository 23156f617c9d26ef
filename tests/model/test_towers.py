"""Tests for tt_mimic.model.towers: the user and item towers on a tiny
prepared dataset (tiny_model)."""

import dataclasses

from absl.testing import parameterized
import numpy as np

import tt_mimic  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from tt_mimic.config import LossConfig
from tt_mimic.model import dat as model_lib
from tt_mimic.model import towers
from tt_mimic.training import pipeline

from tiny_model import NormMixin
from tiny_model import TOWER
from tiny_model import build
from tiny_model import raw_books
from tiny_model import shared_prep
from tiny_model import train_batch
from tiny_model import user_tower


def dense_mean(embedded: tf.Tensor, ids: tf.Tensor) -> tf.Tensor:
  """The reference the sparse means are checked against: the mean of
  embedded[..., j, :] over positions with ids != 0, zeros where none."""
  mask = tf.cast(ids != 0, embedded.dtype)[..., None]
  total = tf.reduce_sum(embedded * mask, axis=-2)
  return tf.math.divide_no_nan(total, tf.reduce_sum(mask, axis=-2))


def dense_attention_pools(attention, embed, ids: tf.Tensor) -> tf.Tensor:
  """The reference the sparse attention pools are checked against: every
  position scored on its own, a masked softmax over the row, the weighted
  sum of the dense [batch, h, d] features -> [batch, heads, d]."""
  batch, length = ids.shape
  flat = tf.reshape(ids, [-1])
  scores = tf.reshape(
      attention(embed(flat), tf.range(tf.size(flat)),
                tf.tile(tf.range(length), [batch])),
      [batch, length, attention.heads])
  valid = (ids != 0)[..., None]
  share = tf.where(valid, tf.nn.softmax(
      tf.where(valid, scores, -1e9), axis=1), 0.0)
  return tf.einsum("bhk,bhd->bkd", share, tf.reshape(
      embed(flat), [batch, length, -1]))


class BagMeanTest(tf.test.TestCase):

  def test_mean_over_non_padding(self):
    # Row 0: ids [1, 0, 2] -> mean of rows 1 and 2, [1, 2] and [5, 6] =
    # [3, 4]. Row 1: all padding -> zeros, not NaN.
    table = tf.constant([[9., 9.], [1., 2.], [5., 6.]])
    ids = tf.constant([[1, 0, 2], [0, 0, 0]])
    self.assertAllClose(towers.bag_mean(ids, table), [[3., 4.], [0., 0.]])
    self.assertAllClose(dense_mean(tf.gather(table, ids), ids),
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

  def test_history_item_dropout_hides_single_books_in_training(self):
    prep, built = build()
    hist = next(h for h in prep.val.history if np.count_nonzero(h) >= 2)
    books = hist[hist != 0][:2]
    user = int(prep.val.user_id[0])

    def batch(*kept):
      row = np.zeros_like(hist)
      row[:len(kept)] = kept
      return {"user_id": tf.constant([user], tf.int64),
              "history": tf.constant(row[None, :])}
    tower = user_tower(prep, built, history_item_dropout=0.5,
                       history_dropout=0.0, user_id_dropout=0.0)
    # Every subset of the two books, at inference (no dropout).
    subsets = [tower(batch(*kept))[0][0] for kept in
               ([books[0], books[1]], [books[0]], [books[1]], [])]
    seen = set()
    for _ in range(60):
      p_u = tower(batch(*books), training=True)[0][0]
      match = [i for i, s in enumerate(subsets)
               if float(tf.reduce_max(tf.abs(p_u - s))) < 1e-5]
      self.assertLen(match, 1)
      seen.add(match[0])
    # Each book is hidden on its own: single books survive, not only all
    # or nothing.
    self.assertEqual(seen, {0, 1, 2, 3})

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

  def test_history_pool_equals_the_dense_mean_on_real_features(self):
    prep, built = build()
    history = tf.constant(prep.val.history[:9])  # repeats and padding
    embed = built.user_tower.embed_books
    books = tf.reshape(embed(tf.reshape(history, [-1])),
                       [9, history.shape[1], -1])
    self.assertAllClose(towers.pool_history(embed, history)[0],
                        dense_mean(books, history), atol=1e-6)

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

  def test_attention_pools_equal_a_dense_softmax_over_the_history(self):
    prep, built = build()
    history = tf.constant(prep.val.history[:9])  # repeats and padding
    history = tf.concat([history, tf.zeros_like(history[:1])], axis=0)
    embed = built.user_tower.embed_books
    attention = towers.HistoryAttention(2)
    pools = towers.pool_history(embed, history, attention=attention)
    self.assertLen(pools, 3)
    expected = dense_attention_pools(attention, embed, history)
    for k in range(2):
      self.assertAllClose(pools[1 + k], expected[:, k], atol=1e-5)
    self.assertAllEqual(pools[1][-1], tf.zeros_like(pools[1][-1]))

  def test_attention_scores_follow_the_formula(self):
    attention = towers.HistoryAttention(2, units=3)
    rows = tf.constant([[1., 0., 2.], [0., -1., 1.]])
    column, position = tf.constant([1, 0, 1]), tf.constant([0, 3, 9])
    scores = attention(rows, column, position).numpy()
    kernel, bias = (v.numpy() for v in attention.hidden.weights)
    query = attention.query.kernel.numpy()
    decay = np.log1p(np.exp(attention.decay.numpy()))  # softplus
    x = rows.numpy()[column.numpy()]
    expected = (np.tanh(x @ kernel + bias) @ query
                - decay[None, :] * np.log1p(position.numpy())[:, None])
    self.assertAllClose(scores, expected, atol=1e-6)
    # A more recent position scores higher for the same book.
    self.assertAllGreater(decay, 0.0)

  def test_attention_makes_order_matter_and_is_trained(self):
    prep, built = build()
    hist = next(h for h in prep.val.history if np.count_nonzero(h) >= 4)
    n = np.count_nonzero(hist)
    reordered = hist.copy()
    reordered[:n] = hist[:n][::-1]
    batch = {"user_id": tf.zeros([2], tf.int64),
             "history": tf.constant(np.stack([hist, reordered]))}
    tower = user_tower(prep, built, history_attention=2)
    with tf.GradientTape() as tape:
      p_u, _ = tower(batch)
      loss = tf.reduce_sum(p_u[0] * tf.range(8, dtype=tf.float32))
    self.assertUnitNorm(p_u)
    # The recency decay tells the two orders apart.
    self.assertGreater(float(tf.reduce_max(tf.abs(p_u[0] - p_u[1]))), 1e-4)
    weights = tower.attention.trainable_variables
    self.assertLen(weights, 4)  # hidden kernel and bias, query, decay
    for grad in tape.gradient(loss, weights):
      self.assertGreater(float(tf.reduce_max(tf.abs(grad))), 0.0)

  def test_interests_are_unit_vectors_of_their_own_pools(self):
    prep, built = build()
    batch = {"user_id": tf.constant(prep.val.user_id[:6]),
             "history": tf.constant(prep.val.history[:6])}
    tower = user_tower(prep, built, interests=3, history_attention=1,
                       user_id_embedding=True)
    p_u, _ = tower(batch)
    self.assertEqual(p_u.shape, (6, 3, 8))
    self.assertUnitNorm(tf.reshape(p_u, [-1, 8]))
    # Each interest has its own attention head (one more is shared).
    self.assertEqual(tower.attention.heads, 4)
    for a, b in ((0, 1), (0, 2), (1, 2)):
      self.assertGreater(float(tf.reduce_max(tf.abs(p_u[:, a] - p_u[:, b]))),
                         1e-4)
    # Each interest is the MLP of the shared parts and its own pool (the
    # tower computes the first layer's shared product once).
    # Pools: the mean, the shared head, then one head per interest.
    pools = towers.pool_history(tower.embed_books, batch["history"],
                                attention=tower.attention)
    count = tf.math.log1p(tf.reduce_sum(
        tf.cast(batch["history"] != 0, tf.float32), axis=1, keepdims=True))
    for k in range(3):
      x = tf.concat([tower.user_id(batch["user_id"]), pools[0], count,
                     pools[1], tower.augmented(batch["user_id"]),
                     pools[2 + k]], axis=-1)
      self.assertAllClose(p_u[:, k], tf.math.l2_normalize(tower.mlp(x), -1),
                          atol=1e-5)
    # One interest is one vector: the single-vector tower's shape.
    p_1, _ = user_tower(prep, built, interests=1)(batch)
    self.assertEqual(p_1.shape, (6, 8))

  @parameterized.parameters(1, 3)
  def test_id_residual_adds_the_linear_id_path(self, interests):
    prep, built = build()
    sizes = prep.vocab.sizes()
    config = dataclasses.replace(TOWER, id_residual=True, interests=interests)
    metadata = towers.ItemFeatureEmbedding(sizes, TOWER.embedding_dim)
    items = towers.ItemTower(sizes, config, metadata)
    users = towers.UserTower(sizes, config, built.user_tower.table, metadata)
    features = {k: tf.gather(v, tf.range(1, 7))
                for k, v in built.user_tower.table.items()}
    batch = {"user_id": tf.constant(prep.val.user_id[:6]),
             "history": tf.constant(prep.val.history[:6])}
    p_v, _ = items(features)
    p_u, _ = users(batch)
    self.assertUnitNorm(p_v)
    # The MLPs' outputs plus the path, then normalized.
    residual = items.residual(features["id"])
    p_v_mlp = items.mlp(tf.concat(
        [items.item_id(features["id"]),
         metadata(features["author"], features["categories"],
                  features["title"]),
         tf.cast(features["numeric"], tf.float32),
         items.augmented(features["id"])], axis=-1))
    self.assertAllClose(p_v, tf.math.l2_normalize(p_v_mlp + residual, -1),
                        atol=1e-5)
    # With the MLPs' last layers a constant b, the towers are b plus the
    # path: the book's own row, and the mean of its history books' rows.
    b = tf.linspace(-1.0, 1.0, TOWER.output_dim)
    for tower in (items, users):
      last = tower.mlp.layers[-1]
      last.kernel.assign(tf.zeros_like(last.kernel))
      last.bias.assign(b)
    p_v, _ = items(features)
    self.assertAllClose(p_v, tf.math.l2_normalize(b + residual, -1),
                        atol=1e-6)
    rows = tf.gather(built.user_tower.table["id"], batch["history"])
    mean = dense_mean(users.residual(rows), batch["history"])

    def per_interest(x):
      return x if interests == 1 else tf.repeat(x[:, None], interests, 1)

    p_u, _ = users(batch)
    self.assertEqual(p_u.shape, (6, 8) if interests == 1 else (6, interests, 8))
    self.assertAllClose(p_u, per_interest(tf.math.l2_normalize(b + mean, -1)),
                        atol=1e-5)
    # The path sees the history after training-time dropout: with the whole
    # history hidden it adds nothing.
    users.config = dataclasses.replace(config, history_dropout=1.0)
    p_u, _ = users(batch, training=True)
    self.assertAllClose(
        p_u, per_interest(tf.math.l2_normalize(tf.tile(b[None], [6, 1]), -1)),
        atol=1e-5)

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


class TowerMimicGradientTest(tf.test.TestCase, parameterized.TestCase):
  """Stop-gradient of the mimic losses on the real towers."""

  @parameterized.parameters(False, True)
  def test_mimic_losses_only_train_their_augmented_vectors(self, mimic_only):
    prep, built = build(amm_mimic_only=mimic_only)
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
    # The main loss reaches a_u and a_v through the towers' inputs, unless
    # --amm_mimic_only cuts that path (and only that one).
    for var in (a_u_var, a_v_var):
      self.assertEqual(grads[var.name] is None, mimic_only, var.name)
    self.assertLen([g for g in grads.values() if g is None],
                   2 if mimic_only else 0)


class SparsePoolingTest(tf.test.TestCase, parameterized.TestCase):
  """The sparse-product means equal the dense masked means, values and
  gradients (they replaced them for speed)."""

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.table = tf.Variable(rng.normal(size=(30, 6)).astype(np.float32))
    ids = rng.integers(0, 30, size=(7, 5))
    ids[1] = 0  # a row with nothing
    ids[2, 2:] = 0
    self.ids = tf.constant(ids)

  def _compare(self, fast, slow):
    with tf.GradientTape(persistent=True) as tape:
      a, b = fast(), slow()
      # A non-linear read-out, so gradients differ where the means do.
      loss_a = tf.reduce_sum(tf.sin(3.0 * a))
      loss_b = tf.reduce_sum(tf.sin(3.0 * b))
    self.assertAllClose(a, b, atol=1e-6)
    self.assertAllClose(tf.convert_to_tensor(tape.gradient(loss_a, self.table)),
                        tf.convert_to_tensor(tape.gradient(loss_b, self.table)),
                        atol=1e-5)

  def test_bag_mean(self):
    self._compare(
        lambda: towers.bag_mean(self.ids, self.table),
        lambda: dense_mean(tf.gather(self.table, self.ids), self.ids))

  @parameterized.parameters(0, 2)
  def test_pool_history(self, recent):
    embed = lambda items: 2.0 * tf.gather(self.table, items)  # noqa: E731

    def slow():
      books = embed(self.ids)  # [batch, h, d], every slot embedded
      pools = [dense_mean(books, self.ids)]
      if recent:
        pools.append(dense_mean(books[:, :recent], self.ids[:, :recent]))
      return tf.concat(pools, axis=-1)

    self._compare(
        lambda: tf.concat(towers.pool_history(embed, self.ids, recent), -1),
        slow)

  def test_attention_pools_and_their_gradients(self):
    attention = towers.HistoryAttention(3, units=4)
    embed = lambda items: 2.0 * tf.gather(self.table, items)  # noqa: E731

    def slow():
      return dense_attention_pools(attention, embed, self.ids)

    def fast():
      return tf.stack(
          towers.pool_history(embed, self.ids, attention=attention)[1:], 1)

    slow()  # builds the attention layer
    weights = [self.table] + attention.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
      a, b = fast(), slow()
      loss_a = tf.reduce_sum(tf.sin(3.0 * a))
      loss_b = tf.reduce_sum(tf.sin(3.0 * b))
    self.assertAllClose(a, b, atol=1e-6)
    for grad_a, grad_b in zip(tape.gradient(loss_a, weights),
                              tape.gradient(loss_b, weights)):
      self.assertGreater(float(tf.reduce_max(tf.abs(
          tf.convert_to_tensor(grad_b)))), 0.0)
      self.assertAllClose(tf.convert_to_tensor(grad_a),
                          tf.convert_to_tensor(grad_b), atol=1e-5)

  def test_empty_history_row_is_zero(self):
    pooled = towers.pool_history(lambda i: tf.gather(self.table, i),
                                 self.ids)[0]
    self.assertAllEqual(pooled[1], tf.zeros([6]))


class IdOnlyTowerTest(tf.test.TestCase, NormMixin):

  def test_towers_are_the_normalized_id_embeddings(self):
    prep = shared_prep()
    built = pipeline.build(
        prep, dataclasses.replace(TOWER, id_only=True, use_amm=False),
        LossConfig(use_cal=False))
    built.model.compute_loss(pipeline.dummy_batch(prep))
    batch = train_batch(prep)
    p_u, a_u = built.user_tower(batch)
    p_v, a_v, _ = built.encoder(batch["item"])
    self.assertIsNone(a_u)
    self.assertIsNone(a_v)
    self.assertUnitNorm(p_u)
    expected = tf.math.l2_normalize(
        built.user_tower.user_id(batch["user_id"]), axis=-1)
    self.assertAllClose(p_u, expected)
    names = {v.name.split("/")[-2] for v in built.model.trainable_variables}
    self.assertEqual(names, {"user_id", "item_id"})

if __name__ == "__main__":
  tf.test.main()
