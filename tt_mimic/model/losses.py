"""DAT's auxiliary losses: adaptive mimic (AMM) and category alignment (CAL).

Reference: Yu et al., "A Dual Augmented Two-tower Model for Online
Large-scale Recommendation", DLP-KDD 2021, eqs. (3)-(6).
"""

from __future__ import annotations

import tt_mimic  # noqa: F401
import tensorflow as tf


def mimic_loss(augmented: tf.Tensor, target: tf.Tensor,
               positive: tf.Tensor | None = None) -> tf.Tensor:
  """Mean squared distance of augmented vectors to the other tower's output.

  loss = mean over positive pairs of ||a - stop_gradient(p)||^2, so the
  other tower gets no gradient from it (DAT eq. 3-4).

  Args:
    augmented: [batch, dim] augmented vectors (a_u or a_v).
    target: [batch, dim] the other tower's embedding of the paired item/user.
    positive: optional [batch] boolean or 0/1 mask of positive pairs; only
      those contribute. None means every pair is positive.

  Returns:
    Scalar loss (0 when there is no positive pair).
  """
  distance = tf.reduce_sum(
      tf.square(augmented - tf.stop_gradient(target)), axis=-1)
  if positive is None:
    return tf.reduce_mean(distance)
  weight = tf.cast(positive, distance.dtype)
  return tf.math.divide_no_nan(tf.reduce_sum(distance * weight),
                               tf.reduce_sum(weight))


def category_alignment_loss(embeddings: tf.Tensor, categories: tf.Tensor,
                            min_count: int = 2) -> tf.Tensor:
  """Sum of ||C(S_major) - C(S_i)||_F^2 over the batch's other categories.

  C(S) is the (population) covariance of the embeddings of the items in
  category S; S_major is the category with most items in the batch (ties:
  the smallest category id). Category id 0 means "no category" and is
  ignored, as are categories with fewer than `min_count` items, whose
  covariance is degenerate.

  Args:
    embeddings: [batch, dim] item embeddings p_v.
    categories: [batch] integer category ids.
    min_count: smallest number of items for a category to take part.

  Returns:
    Scalar loss (0 with fewer than two eligible categories).
  """
  embeddings = tf.convert_to_tensor(embeddings)
  categories = tf.cast(categories, tf.int64)
  valid = categories > 0
  x = tf.boolean_mask(embeddings, valid)
  ids, segment = tf.unique(tf.boolean_mask(categories, valid))
  k = tf.size(ids)
  counts = tf.math.unsorted_segment_sum(tf.ones_like(x[:, 0]), segment, k)
  means = tf.math.unsorted_segment_sum(x, segment, k) / counts[:, None]
  centered = x - tf.gather(means, segment)
  # tr(C_a C_b) = sum over x in a, y in b of (x.y)^2 / (n_a n_b), so every
  # ||C_a - C_b||_F^2 = tr(C_a C_a) + tr(C_b C_b) - 2 tr(C_a C_b) comes from
  # the batch's Gram matrix: [n, n] work instead of n [dim, dim] outer
  # products (the covariances themselves are never formed).
  gram = tf.square(tf.matmul(centered, centered, transpose_b=True))
  by_row = tf.math.unsorted_segment_sum(gram, segment, k)  # [k, n]
  cross = tf.math.unsorted_segment_sum(tf.transpose(by_row), segment, k)
  cross = cross / (counts[:, None] * counts[None, :])  # tr(C_a C_b), [k, k]
  eligible = counts >= min_count

  def loss():
    # Majority: largest count, ties broken by the smaller category id.
    key = tf.cast(counts, tf.float64) * tf.cast(tf.reduce_max(ids) + 1,
                                                tf.float64)
    major = tf.argmax(key - tf.cast(ids, tf.float64))
    self_terms = tf.linalg.diag_part(cross)
    diff = self_terms + self_terms[major] - 2.0 * cross[:, major]
    # Rounding can leave a tiny negative where C_a = C_major.
    diff = tf.maximum(diff, 0.0)
    return tf.reduce_sum(diff * tf.cast(eligible, diff.dtype))

  return tf.cond(tf.reduce_sum(tf.cast(eligible, tf.int32)) > 1, loss,
                 lambda: tf.zeros([], embeddings.dtype))
