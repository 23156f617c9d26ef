"""An ensemble's combined vectors score exactly the sum of its members'."""

from absl.testing import parameterized
import numpy as np

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tt_mimic.model import ensemble
from tt_mimic.training import pipeline


class CombineQueriesTest(tf.test.TestCase, parameterized.TestCase):

  def test_every_choice_of_one_vector_per_member(self):
    # Member 1 has vectors a1 = [1], a2 = [2]; member 2 has b1 = [10],
    # b2 = [20]: the combos are [1|10], [1|20], [2|10], [2|20].
    a = tf.constant([[[1.0], [2.0]]])
    b = tf.constant([[[10.0], [20.0]]])
    self.assertAllEqual(ensemble.combine_queries([a, b]),
                        [[[1, 10], [1, 20], [2, 10], [2, 20]]])

  def test_single_vectors_concatenate(self):
    a, b = tf.constant([[1.0, 2.0]]), tf.constant([[3.0]])
    self.assertAllEqual(ensemble.combine_queries([a, b]), [[1, 2, 3]])

  @parameterized.parameters(((4, 4),), ((4, 1, 3),), ((1, 1),), ((2, 3, 2),))
  def test_best_combined_score_is_the_sum_of_the_members_best(self, ks):
    rng = np.random.default_rng(0)
    batch, items, dim = 3, 7, 5
    queries = [rng.normal(size=(batch, k, dim)).astype(np.float32)
               if k > 1 else rng.normal(size=(batch, dim)).astype(np.float32)
               for k in ks]
    books = [rng.normal(size=(items, dim)).astype(np.float32) for _ in ks]
    combined = ensemble.combine_queries([tf.constant(q) for q in queries])
    joined = np.concatenate(books, axis=1)
    if combined.shape.rank == 2:
      combined = combined[:, None]
    self.assertEqual(combined.shape[1], np.prod(ks))
    got = np.einsum("bkd,nd->bkn", combined.numpy(), joined).max(1)
    want = sum(np.einsum("bkd,nd->bkn", q.reshape(batch, -1, dim), v).max(1)
               for q, v in zip(queries, books))
    self.assertAllClose(got, want, atol=1e-5)

  def test_in_a_graph_of_unknown_counts(self):
    combine = tf.function(ensemble.combine_queries, input_signature=[[
        tf.TensorSpec([None, None, 2], tf.float32),
        tf.TensorSpec([None, None, 3], tf.float32)]])
    out = combine([tf.ones([5, 4, 2]), tf.zeros([5, 3, 3])])
    self.assertEqual(out.shape, (5, 12, 5))


class VariantNamesTest(parameterized.TestCase):

  @parameterized.parameters(
      ("dat", ("dat", False, 1, False)),
      ("dat_refit", ("dat", True, 1, False)),
      ("dat_refit_2", ("dat", True, 2, False)),
      ("dat_3", ("dat", False, 3, False)),
      ("dat_no_cal", ("dat_no_cal", False, 1, False)),
      ("dat_refit_ensemble", ("dat", True, 1, True)),
      ("dat_ensemble", ("dat", False, 1, True)))
  def test_parse(self, name, parts):
    self.assertEqual(pipeline.parse_variant(name), parts)

  @parameterized.parameters("dat_1", "dat_02", "dat_ensemble_2", "als",
                            "popularity_refit", "dat_refit_x")
  def test_not_a_trained_variant(self, name):
    with self.assertRaisesRegex(ValueError, "not a trained variant"):
      pipeline.parse_variant(name)

  def test_member_names_parse_back(self):
    for i in (1, 2, 3):
      name = pipeline.member_name("dat_refit", i)
      self.assertEqual(pipeline.parse_variant(name)[2], i)
    self.assertTrue(pipeline.is_refit("popularity_refit"))
    self.assertFalse(pipeline.is_refit("popularity"))
    self.assertTrue(pipeline.is_refit("dat_refit_ensemble"))
