"""Several trained towers of one run as one two-tower model.

The members' scores add up: a book's score is the sum over members of its
best inner product with the member's query vectors. That sum is itself an
inner product, so an ensemble is a two-tower model that the export, ScaNN
and the server take unchanged: its book vector is the members' book vectors
side by side, and its query vectors are every choice of one query vector
per member, side by side. Because the members' terms are independent,

  max over (k_1, ..., k_M) of sum_m <q_m,k_m, v_m> = sum_m max_k <q_m,k, v_m>,

so the best of the combined query vectors scores exactly the sum of the
members' best scores. With M members of K query vectors the query has K^M
vectors of the summed width (an ensemble of three four-vector towers: 64).

Averaging independently trained networks lowers the variance of their
predictions (Hansen & Salamon, "Neural network ensembles", PAMI 1990;
Lakshminarayanan et al., "Simple and scalable predictive uncertainty
estimation using deep ensembles", NeurIPS 2017).
"""

from __future__ import annotations

from typing import Sequence

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf


def combine_queries(queries: Sequence[tf.Tensor]) -> tf.Tensor:
  """The ensemble's query vectors: every choice of one vector per member.

  Args:
    queries: each member's [batch, dim_m] or [batch, k_m, dim_m] queries.

  Returns:
    [batch, sum dim_m] when every member has one vector, else
    [batch, prod k_m, sum dim_m]; vector i*k_2 + j of two members is
    [q_1,i | q_2,j].

  Example: two members with vectors {a1, a2} and {b1, b2} give
  [a1|b1], [a1|b2], [a2|b1], [a2|b2].
  """
  single = all(query.shape.rank == 2 for query in queries)
  out = None
  for query in queries:
    query = query[:, None] if query.shape.rank == 2 else query
    if out is None:
      out = query
      continue
    # Static counts where known, so the combined count stays static.
    k_out = out.shape[1] or tf.shape(out)[1]
    k_new = query.shape[1] or tf.shape(query)[1]
    out = tf.concat([tf.repeat(out, k_new, axis=1),
                     tf.tile(query, [1, k_out, 1])], axis=-1)
  return out[:, 0] if single else out


class EnsembleUserTower(tf.keras.layers.Layer):
  """Member user towers -> (combined query vectors, None)."""

  def __init__(self, members: Sequence[tf.keras.Model], **kwargs):
    super().__init__(**kwargs)
    self.members = list(members)

  def call(self, features, training=False):
    return combine_queries([m(features, training=training)[0]
                            for m in self.members]), None


class EnsembleItemTower(tf.keras.layers.Layer):
  """Member item towers -> (their book vectors side by side, None)."""

  def __init__(self, members: Sequence[tf.keras.Model], **kwargs):
    super().__init__(**kwargs)
    self.members = list(members)

  def call(self, features, training=False):
    return tf.concat([m(features, training=training)[0]
                      for m in self.members], axis=-1), None


class EnsembleEncoder(tf.keras.layers.Layer):
  """Member item-index encoders -> (book vectors side by side, None, the
  first member's CAL category), as `dat.ItemIndexEncoder` returns."""

  def __init__(self, members: Sequence[tf.keras.Model], **kwargs):
    super().__init__(**kwargs)
    self.members = list(members)

  def call(self, items, training=False):
    outputs = [m(items, training=training) for m in self.members]
    return (tf.concat([o[0] for o in outputs], axis=-1), None,
            outputs[0][2])
