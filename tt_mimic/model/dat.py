"""The DAT retrieval model: two towers, a main loss, AMM and CAL terms.

`DATModel.compute_loss` is the whole model: the main retrieval loss plus
lambda_u * loss_u + lambda_v * loss_v + lambda_ca * loss_CA (DAT eq. 7).
Every term is a per-example mean, so the weights mean the same whatever
the batch size. The Retrieval task sums its cross-entropy (the reduction
that works under tf.distribute) and the sum is divided by the batch size
here.
"""

from __future__ import annotations

import numpy as np

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tt_mimic.config import LossConfig
from tt_mimic.model import losses
from tt_mimic.model import towers


class ItemIndexEncoder(tf.keras.Model):
  """Corpus item indices -> (p_v, a_v, cal_category) via the feature table.

  `item_table` is the dict of variables of `towers.make_item_table`, shared
  with the user tower.
  """

  def __init__(self, item_tower: towers.ItemTower, item_table: dict, **kwargs):
    super().__init__(**kwargs)
    self.tower = item_tower
    self.table = item_table

  def features(self, items: tf.Tensor) -> dict:
    items = tf.cast(items, tf.int64)
    return {k: tf.gather(v, items) for k, v in self.table.items()}

  def call(self, items, training=False):
    features = self.features(items)
    p_v, a_v = self.tower(features, training=training)
    return p_v, a_v, features["cal_category"]


class DATModel(tfrs.Model):
  """Two-tower retrieval with DAT's adaptive mimic and category alignment.

  Batches are dicts of integer tensors: `user_id` [batch], `history`
  [batch, h] and `item` [batch] (corpus index of the positive book).
  """

  def __init__(self, user_tower: towers.UserTower,
               item_encoder: ItemIndexEncoder, item_probability: np.ndarray,
               config: LossConfig, **kwargs):
    super().__init__(**kwargs)
    self.user_tower = user_tower
    self.item_encoder = item_encoder
    self.config = config
    self.num_items = int(item_probability.shape[0]) - 1
    self.item_probability = tf.constant(item_probability, tf.float32)
    self.task = tfrs.tasks.Retrieval(
        loss=tf.keras.losses.CategoricalCrossentropy(
            from_logits=True,
            reduction=tf.keras.losses.Reduction.SUM),
        temperature=config.temperature, remove_accidental_hits=True)
    self.trackers = {name: tf.keras.metrics.Mean(name)
                     for name in ("loss_main", "loss_u", "loss_v", "loss_ca",
                                  "loss", "regularization_loss")}

  @property
  def metrics(self):
    return list(self.trackers.values())

  def train_step(self, inputs):
    """TFRS's step; the losses it logs become epoch means, like the terms.

    TFRS returns the last batch's loss, regularization loss and total, so
    the epoch series in TensorBoard were one (often partial) batch's values.
    """
    logs = super().train_step(inputs)
    self.trackers["regularization_loss"].update_state(
        logs["regularization_loss"])
    logs["loss"] = self.trackers["loss"].result()
    logs["regularization_loss"] = self.trackers["regularization_loss"].result()
    logs["total_loss"] = logs["loss"] + logs["regularization_loss"]
    return logs

  def _sample(self, count: int) -> tf.Tensor:
    # The user tower's generator: one random state, saved with the model.
    return self.user_tower.rng.uniform([count], 1, self.num_items + 1,
                                       tf.int64)

  def main_loss(self, p_u, p_v, items, training):
    if self.config.loss == "bce":
      return self._bce(p_u, p_v, training)
    candidates, ids = p_v, tf.cast(items, tf.int64)
    batch = tf.cast(tf.shape(ids)[0], tf.float32)
    extra = min(self.config.uniform_negatives, self.num_items)
    if extra:
      # At or above the corpus size, the whole corpus once beats sampling
      # as many with replacement (the full softmax, plus in-batch items).
      negatives = (self._sample(extra) if extra < self.num_items else
                   tf.range(1, self.num_items + 1, dtype=tf.int64))
      n_v, _, _ = self.item_encoder(negatives, training=training)
      candidates = tf.concat([p_v, n_v], 0)
      ids = tf.concat([ids, negatives], 0)
    probability = None
    if self.config.log_q:
      # Expected number of draws of each candidate under the mixture of
      # in-batch (unigram) and uniform sampling, scaled to a maximum of 1:
      # TFRS clips the probability into [1e-6, 1] before its log, so raw
      # counts above 1 (every popular book) would lose their correction.
      # A common scale does not change the softmax.
      count = (batch * tf.gather(self.item_probability, ids)
               + extra / self.num_items)
      probability = count / tf.reduce_max(count)
    total = self.task(p_u, candidates,
                      candidate_sampling_probability=probability,
                      candidate_ids=ids, compute_metrics=False)
    return total / batch

  def _bce(self, p_u, p_v, training):
    s = self.config.bce_negatives
    batch = tf.shape(p_u)[0]
    negatives = self._sample(batch * s)
    n_v, _, _ = self.item_encoder(negatives, training=training)
    n_v = tf.reshape(n_v, [batch, s, -1])
    pos = tf.reduce_sum(p_u * p_v, -1, keepdims=True)
    neg = tf.einsum("bd,bsd->bs", p_u, n_v)
    logits = tf.concat([pos, neg], 1) / self.config.temperature
    labels = tf.concat([tf.ones_like(pos), tf.zeros_like(neg)], 1)
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
        labels=labels, logits=logits))

  def compute_loss(self, inputs, training=False):
    p_u, a_u = self.user_tower(inputs, training=training)
    p_v, a_v, category = self.item_encoder(inputs["item"], training=training)
    terms = {"loss_main": self.main_loss(p_u, p_v, inputs["item"], training)}
    cfg = self.config
    zero = tf.zeros([], tf.float32)
    # AMM is on exactly when the towers have a_u and a_v (TowerConfig.use_amm).
    amm = a_u is not None and a_v is not None
    terms["loss_u"] = losses.mimic_loss(a_u, p_v) if amm else zero
    terms["loss_v"] = losses.mimic_loss(a_v, p_u) if amm else zero
    terms["loss_ca"] = (losses.category_alignment_loss(p_v, category)
                        if cfg.use_cal else zero)
    for name, value in terms.items():
      value = tf.debugging.check_numerics(
          value, f"non-finite {name} (DATModel.compute_loss)")
      self.trackers[name].update_state(value)
      terms[name] = value
    total = (terms["loss_main"] + cfg.lambda_u * terms["loss_u"]
             + cfg.lambda_v * terms["loss_v"] + cfg.lambda_ca * terms["loss_ca"])
    self.trackers["loss"].update_state(total)
    # Every term is a per-replica mean; gradients are summed over replicas
    # under tf.distribute, so scale to the mean over the global batch.
    return total / tf.distribute.get_strategy().num_replicas_in_sync
