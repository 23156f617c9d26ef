"""Tests for DAT's auxiliary losses (tt_mimic.model.losses): AMM mimic and
CAL."""

from absl.testing import parameterized
import numpy as np

import tt_mimic  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from tt_mimic.model import losses


def numpy_cal(embeddings, categories, min_count=2):
  """Reference CAL: population covariances, majority by count then id."""
  embeddings = np.asarray(embeddings, np.float64)
  categories = np.asarray(categories)
  ids, counts = np.unique(categories[categories > 0], return_counts=True)
  eligible = ids[counts >= min_count]
  if len(eligible) < 2:
    return 0.0
  # np.unique sorts ids, so argmax picks the smallest id among ties.
  major = ids[np.argmax(counts)]

  def cov(c):
    x = embeddings[categories == c]
    return np.atleast_2d(np.cov(x.T, bias=True))

  base = cov(major)
  return float(sum(np.sum((base - cov(c)) ** 2) for c in eligible
                   if c != major))


class MimicLossTest(tf.test.TestCase, parameterized.TestCase):

  # a = [[1, 2], [0, 1], [3, 0]], p = [[1, 0], [2, 1], [0, 0]]:
  # ||a - p||^2 per row = (0 + 4), (4 + 0), (9 + 0) = 4, 4, 9.
  A = [[1.0, 2.0], [0.0, 1.0], [3.0, 0.0]]
  P = [[1.0, 0.0], [2.0, 1.0], [0.0, 0.0]]

  def test_every_pair_positive_by_default(self):
    # (4 + 4 + 9) / 3.
    self.assertAllClose(losses.mimic_loss(tf.constant(self.A),
                                          tf.constant(self.P)), 17.0 / 3.0)

  @parameterized.named_parameters(
      ("first_and_last_float", [1.0, 0.0, 1.0], 6.5),  # (4 + 9) / 2
      ("middle_bool", [False, True, False], 4.0),  # 4 / 1
      ("last_int", [0, 0, 1], 9.0),
      ("all", [1, 1, 1], 17.0 / 3.0))
  def test_only_positive_pairs_count(self, positive, expected):
    loss = losses.mimic_loss(tf.constant(self.A), tf.constant(self.P),
                             tf.constant(positive))
    self.assertAllClose(loss, expected)

  def test_negative_pairs_do_not_move_the_loss(self):
    # Changing a negative pair's vectors leaves the loss unchanged.
    a = np.array(self.A, np.float32)
    a[1] = [100.0, -100.0]
    loss = losses.mimic_loss(tf.constant(a), tf.constant(self.P),
                             tf.constant([True, False, True]))
    self.assertAllClose(loss, 6.5)

  def test_no_positive_pair_is_zero_not_nan(self):
    a = tf.Variable(self.A)
    with tf.GradientTape() as tape:
      loss = losses.mimic_loss(a, tf.constant(self.P), tf.zeros([3]))
    self.assertEqual(float(loss), 0.0)
    self.assertAllEqual(tape.gradient(loss, a), tf.zeros([3, 2]))

  def test_works_in_graph_mode_with_unknown_batch(self):
    fn = tf.function(losses.mimic_loss, input_signature=[
        tf.TensorSpec([None, 2]), tf.TensorSpec([None, 2]),
        tf.TensorSpec([None], tf.bool)])
    self.assertAllClose(fn(self.A, self.P, [True, False, True]), 6.5)
    self.assertAllClose(fn(tf.zeros([0, 2]), tf.zeros([0, 2]),
                           tf.zeros([0], tf.bool)), 0.0)


class ToyTwoTower(tf.Module):
  """Dense towers over [features | augmented vector], L2-normalized."""

  def __init__(self, dim=3, batch=4):
    super().__init__()
    tf.random.set_seed(0)
    self.user_dense = tf.keras.layers.Dense(dim, name="user_dense")
    self.item_dense = tf.keras.layers.Dense(dim, name="item_dense")
    self.a_u = tf.Variable(tf.random.normal([batch, dim]), name="a_u")
    self.a_v = tf.Variable(tf.random.normal([batch, dim]), name="a_v")
    self.x_u = tf.random.normal([batch, 5])
    self.x_v = tf.random.normal([batch, 6])

  def __call__(self):
    p_u = tf.math.l2_normalize(
        self.user_dense(tf.concat([self.x_u, self.a_u], -1)), -1)
    p_v = tf.math.l2_normalize(
        self.item_dense(tf.concat([self.x_v, self.a_v], -1)), -1)
    return p_u, p_v

  @property
  def user_side(self):
    return self.user_dense.trainable_variables

  @property
  def item_side(self):
    return self.item_dense.trainable_variables


class MimicStopGradientTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.toy = ToyTwoTower()
    self.toy()  # builds the Dense layers

  def _grads(self, which):
    toy = self.toy
    with tf.GradientTape(persistent=True) as tape:
      p_u, p_v = toy()
      loss = {"u": lambda: losses.mimic_loss(toy.a_u, p_v),
              "v": lambda: losses.mimic_loss(toy.a_v, p_u),
              "main": lambda: -tf.reduce_sum(p_u * p_v)}[which]()
    variables = {"user": toy.user_side, "item": toy.item_side,
                 "a_u": [toy.a_u], "a_v": [toy.a_v]}
    return {k: tape.gradient(loss, v) for k, v in variables.items()}

  def _assert_no_gradient(self, grads):
    for g in grads:
      self.assertIsNone(g)

  def _assert_gradient(self, grads):
    for g in grads:
      self.assertIsNotNone(g)
      self.assertGreater(float(tf.reduce_sum(tf.abs(g))), 0.0)

  def test_loss_u_trains_only_a_u(self):
    grads = self._grads("u")
    # sg(p_v): nothing of the item tower (nor a_v, its input) is reached.
    self._assert_no_gradient(grads["item"])
    self._assert_no_gradient(grads["a_v"])
    self._assert_no_gradient(grads["user"])
    self._assert_gradient(grads["a_u"])

  def test_loss_v_trains_only_a_v(self):
    grads = self._grads("v")
    self._assert_no_gradient(grads["user"])
    self._assert_no_gradient(grads["a_u"])
    self._assert_no_gradient(grads["item"])
    self._assert_gradient(grads["a_v"])

  def test_a_u_a_v_get_main_loss_gradient_through_towers(self):
    grads = self._grads("main")
    for name in ("user", "item", "a_u", "a_v"):
      self._assert_gradient(grads[name])

  def test_mimic_gradient_value(self):
    # d/da mean_i ||a_i - p_i||^2 = 2 (a_i - p_i) / batch.
    toy = self.toy
    with tf.GradientTape() as tape:
      _, p_v = toy()
      loss = losses.mimic_loss(toy.a_u, p_v)
    self.assertAllClose(tape.gradient(loss, toy.a_u),
                        2.0 * (toy.a_u - p_v) / 4.0)


class CategoryAlignmentLossTest(tf.test.TestCase, parameterized.TestCase):

  def test_worked_example(self):
    # Category 1: (0,0), (2,0), (1,3); mean (1,1); centered (-1,-1), (1,-1),
    #   (0,2); population covariance [[2/3, 0], [0, 2]].
    # Category 2: (0,0), (0,2); covariance [[0, 0], [0, 1]].
    # Category 0 (no category) and category 3 (one item) are ignored.
    # Majority is 1 (3 items): ||C1 - C2||_F^2 = (2/3)^2 + 1^2 = 13/9.
    emb = [[0, 0], [5, 5], [2, 0], [0, 0], [9, 9], [1, 3], [0, 2]]
    cats = [1, 0, 1, 2, 3, 1, 2]
    loss = losses.category_alignment_loss(tf.constant(emb, tf.float32),
                                          tf.constant(cats))
    self.assertAllClose(loss, 13.0 / 9.0)
    self.assertAllClose(loss, numpy_cal(emb, cats))

  def test_majority_tie_goes_to_smallest_id(self):
    # 1-d embeddings, two items per category: var(cat1)=1, var(cat2)=4,
    # var(cat3)=9. Majority 1: (1-4)^2 + (1-9)^2 = 73 (majority 2 would give
    # 34, majority 3 89). Category 3 comes first in the batch, so order of
    # appearance must not decide.
    emb = [[0.0], [6.0], [0.0], [4.0], [0.0], [2.0]]
    cats = [3, 3, 2, 2, 1, 1]
    loss = losses.category_alignment_loss(tf.constant(emb), tf.constant(cats))
    self.assertAllClose(loss, 73.0)
    self.assertAllClose(numpy_cal(emb, cats), 73.0)

  def test_majority_is_by_count(self):
    # Category 3 has 3 items (values 0, 3, 6: variance 6), so it is the
    # majority despite its larger id: (6-1)^2 + (6-4)^2 = 29.
    emb = [[0.0], [2.0], [0.0], [4.0], [0.0], [3.0], [6.0]]
    cats = [1, 1, 2, 2, 3, 3, 3]
    loss = losses.category_alignment_loss(tf.constant(emb), tf.constant(cats))
    self.assertAllClose(loss, 29.0)
    self.assertAllClose(numpy_cal(emb, cats), 29.0)

  def test_category_zero_is_ignored_even_when_largest(self):
    emb = np.random.default_rng(0).normal(size=(9, 3))
    cats = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2])
    expected = numpy_cal(emb, cats)
    self.assertGreater(expected, 0.0)
    self.assertAllClose(
        losses.category_alignment_loss(tf.constant(emb, tf.float32),
                                       tf.constant(cats)), expected, rtol=1e-5)
    # Moving the unlabeled items does not change the loss.
    emb[:5] *= 100.0
    self.assertAllClose(
        losses.category_alignment_loss(tf.constant(emb, tf.float32),
                                       tf.constant(cats)), expected, rtol=1e-5)

  @parameterized.parameters(
      (0, 16, 4, 5), (1, 32, 8, 3), (2, 64, 4, 10), (3, 7, 2, 6),
      (4, 50, 16, 2))
  def test_matches_numpy(self, seed, batch, dim, num_categories):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(batch, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cats = rng.integers(0, num_categories + 1, size=batch)
    loss = losses.category_alignment_loss(tf.constant(emb, tf.float32),
                                          tf.constant(cats, tf.int32))
    self.assertAllClose(loss, numpy_cal(emb, cats), rtol=1e-4, atol=1e-6)

  @parameterized.parameters(3, 4)
  def test_min_count(self, min_count):
    rng = np.random.default_rng(7)
    emb = rng.normal(size=(12, 3))
    cats = np.array([1, 1, 1, 1, 2, 2, 2, 3, 3, 0, 4, 4])
    loss = losses.category_alignment_loss(tf.constant(emb, tf.float32),
                                          tf.constant(cats), min_count)
    self.assertAllClose(loss, numpy_cal(emb, cats, min_count), rtol=1e-5)

  @parameterized.named_parameters(
      ("single_category", [1, 1, 1, 1]),
      ("single_category_with_unlabeled", [2, 0, 2, 0]),
      ("one_eligible_rest_singletons", [1, 1, 1, 2, 3]),
      ("no_category", [0, 0, 0, 0]),
      ("all_singletons", [1, 2, 3, 4]))
  def test_zero_without_two_eligible_categories(self, cats):
    emb = tf.Variable(np.random.default_rng(1).normal(size=(len(cats), 3)),
                      dtype=tf.float32)
    with tf.GradientTape() as tape:
      loss = losses.category_alignment_loss(emb, tf.constant(cats))
    self.assertEqual(float(loss), 0.0)
    grad = tape.gradient(loss, emb)
    if grad is not None:
      self.assertAllEqual(grad, tf.zeros_like(emb))

  def test_singleton_category_gives_finite_value_and_gradient(self):
    # Category 3 has one item: its covariance is zero, and it must not turn
    # the loss or the gradient into NaN.
    rng = np.random.default_rng(2)
    emb = tf.Variable(rng.normal(size=(7, 4)), dtype=tf.float32)
    cats = tf.constant([1, 1, 1, 2, 2, 3, 0])
    with tf.GradientTape() as tape:
      loss = losses.category_alignment_loss(emb, cats)
    grad = tape.gradient(loss, emb)
    self.assertTrue(np.isfinite(float(loss)))
    self.assertAllClose(loss, numpy_cal(emb.numpy(), cats.numpy()), rtol=1e-5)
    self.assertTrue(np.all(np.isfinite(grad.numpy())))
    # The singleton and the unlabeled item get no gradient.
    self.assertAllEqual(grad[5:], tf.zeros([2, 4]))
    self.assertGreater(float(tf.reduce_sum(tf.abs(grad[:5]))), 0.0)

  def test_graph_mode_unknown_batch(self):
    fn = tf.function(losses.category_alignment_loss, input_signature=[
        tf.TensorSpec([None, 2], tf.float32), tf.TensorSpec([None], tf.int64)])
    emb = [[0, 0], [5, 5], [2, 0], [0, 0], [9, 9], [1, 3], [0, 2]]
    self.assertAllClose(fn(emb, [1, 0, 1, 2, 3, 1, 2]), 13.0 / 9.0)
    self.assertAllClose(fn(emb[:3], [1, 0, 1]), 0.0)
    self.assertAllClose(fn(tf.zeros([0, 2]), tf.zeros([0], tf.int64)), 0.0)


if __name__ == "__main__":
  tf.test.main()
