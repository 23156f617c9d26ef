"""The two towers of the DAT model.

Item tower input z_v = [e(item id) | e(author) | mean e(categories) |
mean e(title tokens) | normalized numerics | a_v]; user tower input
z_u = [e(user id) (with --user_id_embedding, off by default) | pooled
features of the user's history books (their mean, and optionally attention
pools) | a_u].
Each tower is a ReLU MLP followed by L2 normalization (DAT, Yu et al. 2021,
section 3). With `id_residual`, a linear id path is added to each MLP's
output before the normalization: the book's own row of an output-width
table, and the mean of the history books' rows of a second one. a_u and
a_v are the adaptive-mimic vectors, one per id, with the towers' output
dimension.
"""

from __future__ import annotations

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tt_mimic.config import TowerConfig


def _embedding(rows: int, dim: int, name: str) -> tf.keras.layers.Embedding:
  return tf.keras.layers.Embedding(
      rows, dim, name=name,
      embeddings_initializer=tf.keras.initializers.RandomNormal(stddev=0.05))


def _mlp(config: TowerConfig, name: str,
         dtype: str | None = None) -> tf.keras.Sequential:
  """The tower's MLP; `dtype` a Keras policy name for its Dense layers (e.g.
  "mixed_float16": float16 compute, float32 variables)."""
  layers = []
  for units in config.hidden_units:
    layers.append(tf.keras.layers.Dense(units, activation="relu", dtype=dtype))
    if config.dropout:
      # A tf.random.Generator (force_generator) rather than a stateful op:
      # its state is a variable, saved and restored with the checkpoint.
      layers.append(tf.keras.layers.Dropout(config.dropout,
                                            force_generator=True))
  layers.append(tf.keras.layers.Dense(config.output_dim, dtype=dtype))
  return tf.keras.Sequential(layers, name=name)


def _tower_input(augmented: tf.Tensor, config: TowerConfig) -> tf.Tensor:
  """a_u or a_v as a tower's input: cut from the main loss's gradient under
  `config.amm_mimic_only` (the mimic loss, which reads the vector itself,
  still trains it). Row 0 of a_u, read where training hid the user's id,
  is then trained by no loss: the mimic loss trains the user's own row. It
  stays a fixed random vector (under adamw, decaying to zero) that the MLP
  learns to read as "unknown"."""
  return tf.stop_gradient(augmented) if config.amm_mimic_only else augmented


def bag_mean(ids: tf.Tensor, table: tf.Tensor) -> tf.Tensor:
  """Mean of table rows over each row's non-zero ids: [n, t] -> [n, d].

  Zeros for a row of padding only. A sparse [n, rows of table] x [rows, d]
  product: no [n, t, d] tensor of gathered rows, and the table's gradient
  is dense (one table-sized update) instead of an [n * t, d] slice that the
  optimizer must first sum by row.
  """
  ids = tf.cast(ids, tf.int64)
  keep = ids != 0
  where = tf.where(keep)  # [nnz, 2] (row, position), row-major
  values = tf.gather_nd(ids, where)
  count = tf.reduce_sum(tf.cast(keep, table.dtype), axis=1)
  weights = 1.0 / tf.gather(count, where[:, 0])
  shape = tf.stack([tf.shape(ids, out_type=tf.int64)[0],
                    tf.shape(table, out_type=tf.int64)[0]])
  bags = tf.SparseTensor(tf.stack([where[:, 0], values], axis=1), weights,
                         shape)
  return tf.sparse.sparse_dense_matmul(bags, table)


def make_item_table(arrays: dict) -> dict:
  """The item feature table as non-trainable variables (saved, not trained)."""
  return {k: tf.Variable(v, trainable=False, name=f"item_table_{k}")
          for k, v in arrays.items()}


class ItemFeatureEmbedding(tf.keras.layers.Layer):
  """Item metadata (author, categories, title) -> one concatenated vector.

  Shared by the item tower and by the user tower's history pooling.
  """

  def __init__(self, sizes: dict, dim: int, **kwargs):
    super().__init__(**kwargs)
    self.author = _embedding(sizes["authors"] + 2, dim, "author")
    self.category = _embedding(sizes["categories"] + 2, dim, "category")
    self.title = _embedding(sizes["title_tokens"] + 2, dim, "title_token")

  def build(self, input_shape=None):
    for layer in (self.author, self.category, self.title):
      layer.build([None])
    super().build(input_shape)

  def call(self, author, categories, title):
    """author: [n]; categories: [n, c]; title: [n, t] -> [n, 3 dim]."""
    return tf.concat([self.author(author),
                      bag_mean(categories, self.category.embeddings),
                      bag_mean(title, self.title.embeddings)], axis=-1)


class ItemTower(tf.keras.Model):
  """Preprocessed item features -> (p_v, a_v).

  Inputs: a dict with `id` [batch] (item-id embedding index, 0 = unknown),
  `author` [batch], `categories` [batch, c], `title` [batch, t],
  `numeric` [batch, f] (see features.ItemPreprocessor).
  """

  def __init__(self, sizes: dict, config: TowerConfig,
               metadata: ItemFeatureEmbedding, mlp_dtype: str | None = None,
               **kwargs):
    """`mlp_dtype`: the Keras dtype policy of the MLP (default float32)."""
    super().__init__(**kwargs)
    self.config = config
    # ID-only towers are the id embedding itself, as wide as the output.
    self.item_id = _embedding(
        sizes["items"] + 1,
        config.output_dim if config.id_only else config.embedding_dim,
        "item_id")
    if config.id_only:
      self.metadata = self.augmented = self.mlp = self.residual = None
      return
    self.metadata = metadata
    self.augmented = (_embedding(sizes["items"] + 1, config.output_dim, "a_v")
                      if config.use_amm else None)
    self.mlp = _mlp(config, "item_mlp", mlp_dtype)
    self.residual = (_embedding(sizes["items"] + 1, config.output_dim,
                                "item_residual")
                     if config.id_residual else None)

  def call(self, features, training=False):
    ids = features["id"]
    if self.config.id_only:
      return tf.math.l2_normalize(self.item_id(ids), axis=-1), None
    parts = [self.item_id(ids),
             self.metadata(features["author"], features["categories"],
                           features["title"]),
             tf.cast(features["numeric"], tf.float32)]
    augmented = None
    if self.augmented is not None:
      augmented = self.augmented(ids)
      parts.append(_tower_input(augmented, self.config))
    output = tf.cast(self.mlp(tf.concat(parts, axis=-1), training=training),
                     tf.float32)
    if self.residual is not None:
      output += self.residual(ids)
    return tf.math.l2_normalize(output, axis=-1), augmented


class HistoryAttention(tf.keras.layers.Layer):
  """Scores of history books for `heads` attention pools of the history.

  Head k scores book i at recency position p (0 = most recent) as
  q_k . tanh(W x_i + b) - softplus(d_k) log(1 + p): a learned score of the
  book's features (the structured self-attention of Lin et al., ICLR 2017,
  with one query per head) and a learned recency decay. The scores do not
  depend on the candidate, so the tower stays a two-tower.
  """

  def __init__(self, heads: int, units: int = 64, **kwargs):
    super().__init__(**kwargs)
    self.heads = heads
    self.hidden = tf.keras.layers.Dense(units, activation="tanh",
                                        name="attention_hidden")
    self.query = tf.keras.layers.Dense(heads, use_bias=False,
                                       name="attention_query")

  def build(self, input_shape):
    self.hidden.build(input_shape)
    self.query.build(input_shape[:-1] + [self.hidden.units])
    # softplus(-2) ~ 0.13: a mild preference for recent books at the start.
    self.decay = self.add_weight(
        name="recency_decay", shape=[self.heads],
        initializer=tf.keras.initializers.Constant(-2.0))
    super().build(input_shape)

  def call(self, rows: tf.Tensor, column: tf.Tensor,
           position: tf.Tensor) -> tf.Tensor:
    """rows: [u, d] features of the distinct books; column: [n] each history
    entry's row; position: [n] its recency rank -> [n, heads] scores."""
    scores = tf.gather(self.query(self.hidden(rows)), column)
    recency = tf.math.log1p(tf.cast(position, scores.dtype))[:, None]
    return scores - tf.nn.softplus(self.decay) * recency


def pool_history(embed, history: tf.Tensor, recent: int = 0,
                 attention: HistoryAttention | None = None
                 ) -> list[tf.Tensor]:
  """Means of `embed`(book) over each row's history, one embedding per book.

  Each distinct book of the batch is embedded once and the mean is a sparse
  [batch, distinct books] x [distinct books, d] product: no [batch, h, d]
  tensor is formed, forward or backward (gathering one was most of a
  training step's time; benchmarks/throughput.py).

  Args:
    embed: [n] item indices -> [n, d] features.
    history: [batch, h] item indices, most recent first, 0 = padding.
    recent: when positive, also the mean over the first `recent` positions.
    attention: when given, also one attention-weighted mean per head.

  Returns:
    [mean over the whole history] (+ [mean over the recent part])
    (+ [one pool per attention head]), each [batch, d]; zeros for a row
    without history.
  """
  history = tf.cast(history, tf.int64)
  batch, length = tf.shape(history)[0], tf.shape(history)[1]
  flat = tf.reshape(history, [-1])
  unique, column = tf.unique(flat)
  rows = embed(unique)
  row = tf.repeat(tf.range(batch, dtype=tf.int64), length)
  position = tf.tile(tf.range(length), [batch])
  shape = tf.stack([tf.cast(batch, tf.int64),
                    tf.cast(tf.size(unique), tf.int64)])

  def weighted(r, c, weights):
    # The gradient reaches `weights` too (the attention scores).
    return tf.sparse.sparse_dense_matmul(
        tf.SparseTensor(tf.stack([r, c], axis=1), weights, shape), rows)

  def entries(keep):
    """(row, distinct-book column) of each kept history entry."""
    return (tf.boolean_mask(row, keep),
            tf.cast(tf.boolean_mask(column, keep), tf.int64))

  def mean(r, c):
    count = tf.math.unsorted_segment_sum(tf.ones_like(r, rows.dtype), r,
                                         batch)
    return weighted(r, c, 1.0 / tf.gather(count, r))

  valid = flat != 0
  r, c = entries(valid)
  out = [mean(r, c)]
  if recent > 0:
    out.append(mean(*entries(valid & (position < recent))))
  if attention is not None:
    scores = attention(rows, c, tf.boolean_mask(position, valid))
    # A softmax over each row's entries (rows without history have none).
    top = tf.math.unsorted_segment_max(scores, r, batch)
    exp = tf.exp(scores - tf.stop_gradient(tf.gather(top, r)))
    total = tf.math.unsorted_segment_sum(exp, r, batch)
    share = exp / tf.gather(total, r)
    out.extend(tf.unstack(head_pools(rows, r, c, share, batch), axis=1))
  return out


@tf.custom_gradient
def head_pools(rows: tf.Tensor, row: tf.Tensor, column: tf.Tensor,
               share: tf.Tensor, batch: tf.Tensor):
  """Every head's weighted sum of history features in one sparse product.

  rows: [u, d] features of the distinct books; row, column: [n] each history
  entry's batch row and distinct-book row; share: [n, heads] its weight in
  each head; batch: the number of batch rows -> [batch, heads, d].

  The gradient is written out because TensorFlow's own for a sparse
  product's values is a batch of [1, d] x [d, 1] products per head, which
  took a fifth of a training step with four interests
  (`benchmarks/throughput.py --profile_dir`). Here each head's is one
  elementwise product of gathered rows, the books' features gathered once.
  """
  heads = share.shape[1]  # static: the gradient runs one product per head
  flat_row = (tf.repeat(row, heads) * heads
              + tf.tile(tf.range(heads, dtype=tf.int64), [tf.size(row)]))
  sparse = tf.SparseTensor(
      tf.stack([flat_row, tf.repeat(column, heads)], axis=1),
      tf.reshape(share, [-1]),
      tf.stack([tf.cast(batch, tf.int64) * heads,
                tf.cast(tf.shape(rows)[0], tf.int64)]))
  pooled = tf.reshape(tf.sparse.sparse_dense_matmul(sparse, rows),
                      [batch, heads, tf.shape(rows)[1]])

  def grad(upstream):
    flat = tf.reshape(upstream, [-1, tf.shape(rows)[1]])
    d_rows = tf.sparse.sparse_dense_matmul(sparse, flat, adjoint_a=True)
    books = tf.gather(rows, column)
    d_share = tf.stack(
        [tf.reduce_sum(tf.gather(upstream[:, k], row) * books, axis=-1)
         for k in range(heads)], axis=1)
    return d_rows, None, None, d_share, None

  return pooled, grad


class UserTower(tf.keras.Model):
  """User id and history of corpus item indices -> (p_u, a_u).

  a_u is always the given user's own augmented vector, also for rows whose
  id the training-time user-id dropout hid from the tower's input.

  Inputs: a dict with `user_id` [batch] (0 = unknown user) and `history`
  [batch, h] corpus item indices, most recent first, 0 = padding. The
  history's ids and metadata are gathered from `item_table` (a dict of
  non-trainable variables, see `make_item_table`).
  """

  def __init__(self, sizes: dict, config: TowerConfig, item_table: dict,
               metadata: ItemFeatureEmbedding,
               item_id: tf.keras.layers.Embedding | None = None,
               rng: tf.random.Generator | None = None,
               mlp_dtype: str | None = None, **kwargs):
    """`item_id`: the item tower's id embedding, used for the history books
    when `config.share_item_embedding` (else the tower has its own).
    `rng`: the generator of the training-time dropouts of ids and histories
    (a new one seeded 0 if None). Its state is a variable, so a checkpoint
    holds it and a resumed run draws what an uninterrupted one would.
    `mlp_dtype`: the Keras dtype policy of the MLP (default float32)."""
    super().__init__(**kwargs)
    self.config = config
    self.rng = rng if rng is not None else tf.random.Generator.from_seed(0)
    self.table = item_table
    self.user_id = (_embedding(
        sizes["users"] + 1,
        config.output_dim if config.id_only else config.embedding_dim,
        "user_id") if config.user_id_embedding or config.id_only else None)
    if config.id_only:
      self.history_id = self.metadata = self.augmented = self.mlp = None
      self.residual = None
      self.attention = None
      return
    if config.share_item_embedding:
      if item_id is None:
        raise ValueError("share_item_embedding needs the item tower's id "
                         "embedding.")
      self.history_id = item_id
    else:
      self.history_id = _embedding(sizes["items"] + 1, config.embedding_dim,
                                   "history_item_id")
    self.metadata = metadata
    self.augmented = (_embedding(sizes["users"] + 1, config.output_dim, "a_u")
                      if config.use_amm else None)
    heads = config.history_attention + self.interest_heads
    self.attention = HistoryAttention(heads) if heads else None
    self.mlp = _mlp(config, "user_mlp", mlp_dtype)
    self.residual = (_embedding(sizes["items"] + 1, config.output_dim,
                                "history_residual")
                     if config.id_residual else None)

  def call(self, features, training=False):
    user = own = tf.cast(features["user_id"], tf.int64)
    if self.config.id_only:
      return tf.math.l2_normalize(self.user_id(user), axis=-1), None
    if training and self.config.user_id_dropout > 0:
      drop = self.rng.uniform(tf.shape(user)) < self.config.user_id_dropout
      user = tf.where(drop, tf.zeros_like(user), user)
    history = tf.cast(features["history"], tf.int64)
    if training and self.config.history_dropout > 0:
      hide = (self.rng.uniform(tf.shape(history)[:1])
              < self.config.history_dropout)
      history = tf.where(hide[:, None], tf.zeros_like(history), history)
    if training and self.config.history_item_dropout > 0:
      hide = (self.rng.uniform(tf.shape(history))
              < self.config.history_item_dropout)
      history = tf.where(hide, tf.zeros_like(history), history)
    valid = tf.cast(history != 0, tf.float32)
    count = tf.math.log1p(tf.reduce_sum(valid, axis=1, keepdims=True))
    # History is most recent first, so the recent pool is its head.
    pools = pool_history(self.embed_books, history, self.config.recent_length,
                         self.attention)
    interest = pools[len(pools) - self.interest_heads:]
    pools = pools[:len(pools) - self.interest_heads]
    parts = [pools[0], count] + pools[1:]
    if self.user_id is not None:
      parts.insert(0, self.user_id(user))
    augmented = None
    if self.augmented is not None:
      parts.append(_tower_input(self.augmented(user), self.config))
      # The mimic loss trains the user's own a_u even where the tower's
      # input had the id hidden: hiding is there to teach the tower about
      # unseen users, not to move their mimic updates to the unknown row.
      augmented = self.augmented(own)
    shared = tf.concat(parts, axis=-1)
    if not interest:
      output = tf.cast(self.mlp(shared, training=training), tf.float32)
    else:
      output = self._interests(shared, tf.stack(interest, axis=1), training)
    if self.residual is not None:
      linear = pool_history(self.embed_residual, history)[0]
      # Every interest vector gets the same linear path.
      output += linear if not interest else linear[:, None]
    return tf.math.l2_normalize(output, axis=-1), augmented

  def _interests(self, shared: tf.Tensor, pools: tf.Tensor,
                 training: bool) -> tf.Tensor:
    """The MLP of each [shared parts | interest k's pool] -> [b, k, out].

    The first layer's product with the shared parts is computed once per
    user rather than once per interest (W [s; p] = W_s s + W_p p); the rest
    of the MLP runs on each interest.
    """
    width = shared.shape[-1]
    if not self.mlp.built:
      self.mlp.build([None, width + pools.shape[-1]])
    first, rest = self.mlp.layers[0], self.mlp.layers[1:]
    dtype = first.compute_dtype
    kernel = tf.cast(first.kernel, dtype)
    hidden = (tf.matmul(tf.cast(shared, dtype), kernel[:width])[:, None]
              + tf.einsum("bkp,ph->bkh", tf.cast(pools, dtype),
                          kernel[width:])
              + tf.cast(first.bias, dtype))
    x = tf.reshape(first.activation(hidden), [-1, first.units])
    for layer in rest:
      x = layer(x, training=training)
    return tf.reshape(tf.cast(x, tf.float32),
                      [tf.shape(shared)[0], -1, self.config.output_dim])

  @property
  def interest_heads(self) -> int:
    """Attention heads that make the interests (0 for one query vector)."""
    return self.config.interests if self.config.interests > 1 else 0

  def embed_residual(self, items: tf.Tensor) -> tf.Tensor:
    """[n] corpus item indices -> [n, output_dim] rows of the linear path."""
    return self.residual(tf.gather(self.table["id"], items))

  def embed_books(self, items: tf.Tensor) -> tf.Tensor:
    """[n] corpus item indices -> [n, 4 * embedding_dim] history features."""
    meta = self.metadata(tf.gather(self.table["author"], items),
                         tf.gather(self.table["categories"], items),
                         tf.gather(self.table["title"], items))
    return tf.concat(
        [self.history_id(tf.gather(self.table["id"], items)), meta], axis=-1)
