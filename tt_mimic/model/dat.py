"""The DAT retrieval model: two towers, a main loss, AMM and CAL terms.

`DATModel.compute_loss` is the whole model: the main retrieval loss plus
lambda_u * loss_u + lambda_v * loss_v + lambda_ca * loss_CA (DAT eq. 7).
Every term is a per-example mean, so the weights mean the same whatever
the batch size. The Retrieval task sums its cross-entropy (the reduction
that works under tf.distribute) and the sum is divided by the batch size
here. Under tf.distribute the in-batch softmax and CAL see the whole global
batch, so R replicas compute the loss and gradients of one replica on the
same global batch (see `DATModel.compute_loss`).
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
  [batch, h] and `item` [batch] (corpus index of the positive book), and
  optionally float `weight` [batch], each example's weight in the main
  loss (`--user_weight_power`).
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
    """TFRS's step (loss + regularization, gradients, update), with the
    logged losses as epoch means like the terms, and loss scaling when the
    optimizer is a LossScaleOptimizer (--precision=mixed_float16).

    TFRS returns the last batch's loss, regularization loss and total, so
    the epoch series in TensorBoard were one (often partial) batch's values.
    """
    scaling = isinstance(self.optimizer,
                         tf.keras.mixed_precision.LossScaleOptimizer)
    with tf.GradientTape() as tape:
      loss = self.compute_loss(inputs, training=True)
      regularization_loss = tf.reduce_sum(
          [tf.reduce_sum(term) for term in self.losses])
      total_loss = loss + regularization_loss
      scaled = (self.optimizer.get_scaled_loss(total_loss) if scaling
                else total_loss)
    gradients = tape.gradient(scaled, self.trainable_variables)
    if scaling:
      gradients = self.optimizer.get_unscaled_gradients(gradients)
    self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
    self.trackers["regularization_loss"].update_state(regularization_loss)
    logs = {metric.name: metric.result() for metric in self.metrics}
    logs["total_loss"] = logs["loss"] + logs["regularization_loss"]
    return logs

  def _sample(self, count: int) -> tf.Tensor:
    # The user tower's generator: one random state, saved with the model.
    return self.user_tower.rng.uniform([count], 1, self.num_items + 1,
                                       tf.int64)

  def main_loss(self, p_u, p_v, items, training, batch=None, weight=None):
    """This replica's share of the main loss's mean over the global batch.

    Args:
      p_u: [b, d] this replica's query embeddings.
      p_v: [n, d] candidate embeddings: the global batch's items, this
        replica's b positives first and in its queries' order (TFRS's
        Retrieval takes query i's positive to be candidate i).
      items: [n] their corpus indices.
      training: passed to the item tower for sampled negatives.
      batch: the global batch size (default n: one replica).
      weight: optional [b] weight of each query's loss (default 1).

    Returns:
      The sum of this replica's per-query losses divided by `batch`; the sum
      over replicas is the mean over the global batch.
    """
    ids = tf.cast(items, tf.int64)
    batch = (tf.cast(tf.shape(ids)[0], tf.float32) if batch is None
             else tf.cast(batch, tf.float32))
    if self.config.loss == "bce":
      positives = p_v[:tf.shape(p_u)[0]]
      if p_u.shape.rank == 3:
        p_u = select_interest(p_u, positives)
      return self._bce(p_u, positives, training, weight) / batch
    candidates = p_v
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
    total = self.task(p_u, candidates, sample_weight=weight,
                      candidate_sampling_probability=probability,
                      candidate_ids=ids, compute_metrics=False)
    return total / batch

  def _bce(self, p_u, p_v, training, weight=None):
    s = self.config.bce_negatives
    batch = tf.shape(p_u)[0]
    negatives = self._sample(batch * s)
    n_v, _, _ = self.item_encoder(negatives, training=training)
    n_v = tf.reshape(n_v, [batch, s, -1])
    pos = tf.reduce_sum(p_u * p_v, -1, keepdims=True)
    neg = tf.einsum("bd,bsd->bs", p_u, n_v)
    logits = tf.concat([pos, neg], 1) / self.config.temperature
    labels = tf.concat([tf.ones_like(pos), tf.zeros_like(neg)], 1)
    # The (weighted) sum over queries of each query's mean over its 1 + s
    # logits.
    per_query = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(
        labels=labels, logits=logits), axis=1) / (1 + s)
    if weight is not None:
      per_query *= tf.cast(weight, per_query.dtype)
    return tf.reduce_sum(per_query)

  def compute_loss(self, inputs, training=False):
    """This replica's share of the loss of the global batch (see
    `loss_terms`): main + lambda_u loss_u + lambda_v loss_v + lambda_ca
    loss_ca."""
    terms = self.loss_terms(inputs, training)
    cfg = self.config
    total = (terms["loss_main"] + cfg.lambda_u * terms["loss_u"]
             + cfg.lambda_v * terms["loss_v"] + cfg.lambda_ca * terms["loss_ca"])
    # The trackers average over replicas: R x a share is the global value.
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    for name, value in [*terms.items(), ("loss", total)]:
      self.trackers[name].update_state(value * replicas)
    return total

  def loss_terms(self, inputs, training=False) -> dict:
    """This replica's share of each loss term of the global batch.

    Under tf.distribute each replica holds part of the global batch, and
    the optimizer sums the replicas' gradients. So that R replicas compute
    what one replica computes on the whole batch, the in-batch softmax and
    CAL see the global batch's items (gathered across replicas, with
    gradients flowing back to each replica's own items), and every term is
    this replica's share: main and mimic terms are sums over its examples
    divided by the global batch size; CAL, the same value on every replica,
    is divided by R. (Sampled uniform negatives are drawn per replica: equal
    in distribution, not in value.)
    """
    p_u, a_u = self.user_tower(inputs, training=training)
    p_v, a_v, category = self.item_encoder(inputs["item"], training=training)
    items = tf.cast(inputs["item"], tf.int64)
    all_v, all_items, all_category, batch, replicas = _global_batch(
        p_v, items, category)
    share = tf.cast(tf.shape(items)[0], tf.float32) / batch
    terms = {"loss_main": self.main_loss(p_u, all_v, all_items, training,
                                         batch, inputs.get("weight"))}
    if p_u.shape.rank == 3:
      # Several interests: the mimic target is the one nearest the positive.
      p_u = select_interest(p_u, p_v)
    cfg = self.config
    zero = tf.zeros([], tf.float32)
    # AMM is on exactly when the towers have a_u and a_v (TowerConfig.use_amm).
    amm = a_u is not None and a_v is not None
    # multiply_no_nan: a replica left without examples by a last, partial
    # global batch has share 0 and an undefined (NaN) mean.
    terms["loss_u"] = (tf.math.multiply_no_nan(losses.mimic_loss(a_u, p_v),
                                               share) if amm else zero)
    terms["loss_v"] = (tf.math.multiply_no_nan(losses.mimic_loss(a_v, p_u),
                                               share) if amm else zero)
    terms["loss_ca"] = (losses.category_alignment_loss(all_v, all_category)
                        / replicas if cfg.use_cal else zero)
    return {name: tf.debugging.check_numerics(
        value, f"non-finite {name} (DATModel.compute_loss)")
            for name, value in terms.items()}


def select_interest(p_u: tf.Tensor, p_v: tf.Tensor) -> tf.Tensor:
  """[b, k, d] interests, [b, d] positives -> [b, d] each example's interest
  nearest its positive (the hard label-aware attention of MIND and
  ComiRec: Li et al. 2019, Cen et al. 2020); the choice takes no gradient."""
  nearest = tf.argmax(tf.einsum("bkd,bd->bk", p_u, tf.stop_gradient(p_v)),
                      axis=1)
  return tf.gather(p_u, nearest, batch_dims=1)


def _global_batch(p_v, items, category):
  """The global batch's items as seen from this replica.

  Returns:
    (p_v, items, category) of every replica's examples, this replica's
    first (rotated, so its positives keep their positions), the global
    batch size (float) and the number of replicas (float). Outside
    tf.distribute, or with one replica, the inputs themselves.
  """
  local = tf.shape(items)[0]
  context = tf.distribute.get_replica_context()
  if context is None or context.num_replicas_in_sync == 1:
    return p_v, items, category, tf.cast(local, tf.float32), 1.0
  # tf.identity: under MultiWorkerMirroredStrategy in a tf.function, a
  # gathered tensor needs a device, which a function input lacks.
  sizes = context.all_gather(tf.identity(local[None]), axis=0)
  offset = tf.reduce_sum(sizes[:context.replica_id_in_sync_group])
  # One gather per tensor: a batched gather needs one dtype.
  gathered = [tf.roll(context.all_gather(tf.identity(t), axis=0), -offset,
                      axis=0)
              for t in (p_v, items, tf.cast(category, tf.int64))]
  return (*gathered, tf.cast(tf.reduce_sum(sizes), tf.float32),
          float(context.num_replicas_in_sync))
