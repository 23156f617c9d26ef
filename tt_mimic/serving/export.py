"""SavedModel export: the serving model (query tower, brute force, per-user
state), the ScaNN index and the candidate tower.

Layout under `<model_dir>/export/`:
  serving/1/          the self-contained model (TensorFlow Serving's
                      versioned layout: `--model_base_path=<export>/serving`):
                      user_id (+ history, exclusions) -> parent_asin, scores
                      over the whole corpus (brute force), the user's read
                      books excluded; and `query`: user_id (+ history) ->
                      embedding. The only SavedModel with per-user tables.
  index_scann/        embedding (+ exclusions) -> parent_asin, scores through
                      ScaNN (load after `import scann`); no per-user table
  candidate/          raw book metadata -> embedding (with
                      --title_standardize=unicode, load after `import
                      tensorflow_text`: recommender.load_candidate)
  items.parquet       corpus metadata, row-aligned with embeddings.npy
  embeddings.npy      candidate embeddings of the corpus
  seen.parquet        every known (userId, parent_asin) pair
  export.json         k, ScaNN parameters and tuning, sizes, provenance
  models.config       a TensorFlow Serving model config for serving/

This is export version 1; `tt-mimic catalog` adds versions (serving/<n>/
and versions/<n>/) and names the served one in `CURRENT` (see
tt_mimic.serving.recommender). A new export removes them.

Per-user state is stored once, compactly: every user's known books as one
int32 array in time order with int64 row splits (a user's history is the
tail of their row), and the user-id embedding index as int32.

Each SavedModel holds the Keras preprocessing layers, so it takes raw
strings. Unknown users with no history get the popularity list from the
index models, never an error. Re-export an existing run with
`tt-mimic export --model_dir=<run>`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time

from absl import logging
import numpy as np
import pandas as pd

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
import tensorflow_recommenders as tfrs

from tt_mimic.config import ExportConfig
from tt_mimic.model import ease as ease_lib
from tt_mimic.serving import recommender as recommend
from tt_mimic.training import pipeline

try:
  import scann  # noqa: F401  pylint: disable=unused-import
  HAVE_SCANN = True
except ImportError:  # pragma: no cover - scann is a pinned dependency
  HAVE_SCANN = False

SCANN_SAVE_OPTIONS = tf.saved_model.SaveOptions(namespace_whitelist=["Scann"])


def scann_params(num_items: int, config: ExportConfig) -> dict:
  """ScaNN tree and reordering sizes for a corpus of `num_items` books.

  About sqrt(N) leaves; searching a share of them that falls with N (half
  of a 10k corpus, 5% of millions, but always enough leaves to hold eight
  times the results retrieved) and exact reordering of several times the
  number of results keep ScaNN's top-k close to brute force while the cost
  grows sub-linearly.
  """
  retrieve = config.k + config.max_exclusions
  leaves = config.scann_num_leaves or max(1, min(int(round(math.sqrt(num_items))),
                                                 num_items // 10 or 1, 2000))
  share = 0.5 if num_items <= 10_000 else 0.1 if num_items <= 10**6 else 0.05
  # Searched leaves must hold several times the results asked for.
  share = min(1.0, max(share, 8.0 * retrieve / max(num_items, 1)))
  search = config.scann_leaves_to_search or max(1, min(leaves, math.ceil(
      leaves * share)))
  reorder = config.scann_reorder or min(num_items, max(4 * retrieve, 500))
  return {"num_leaves": int(leaves), "num_leaves_to_search": int(search),
          "num_reordering_candidates": int(reorder)}


def compact_history(ids: tf.Tensor, length: int) -> tf.Tensor:
  """[batch, n] ids in time order (0 = none) -> [batch, length] most recent first."""
  reversed_ids = tf.reverse(ids, axis=[1])
  order = tf.argsort(tf.cast(reversed_ids == 0, tf.int32), axis=1, stable=True)
  packed = tf.gather(reversed_ids, order, batch_dims=1)
  pad = tf.maximum(length - tf.shape(packed)[1], 0)
  return tf.pad(packed, [[0, 0], [0, pad]])[:, :length]


def _int32(values: np.ndarray, what: str) -> np.ndarray:
  if len(values) and int(np.max(values)) > np.iinfo(np.int32).max:
    raise ValueError(f"{what} exceed int32.")
  return np.asarray(values, np.int32)


class QueryModule(tf.Module):
  """Raw user ids (and optional histories) -> user embeddings.

  Holds the per-user state: the user-id lookup, the user-id embedding
  index (int32) and every user's known books (corpus indices, int32, in
  time order, as rows of a ragged array given by int64 row splits).
  """

  def __init__(self, user_tower, users, items, user_id_index, seen_items,
               seen_splits, history_length: int,
               tower_scale: float | None = None):
    """`seen_items`, `seen_splits`: see `user_seen`. `tower_scale`: the
    factor of a blend with EASE (model.ease.Blend): the embedding is the
    towers' times it, and `books` (each user's known books, which EASE
    reads) is returned beside it."""
    super().__init__()
    self.tower_scale = tower_scale
    self.user_lookup = tf.keras.layers.StringLookup(
        vocabulary=list(users), mask_token=None, num_oov_indices=1)
    self.item_lookup = tf.keras.layers.StringLookup(
        vocabulary=list(items), mask_token=None, num_oov_indices=1)
    self.user_id_index = tf.Variable(_int32(user_id_index, "user-id indices"),
                                     trainable=False)
    self.seen_items = tf.Variable(_int32(seen_items, "corpus indices"),
                                  trainable=False)
    self.seen_splits = tf.Variable(np.asarray(seen_splits, np.int64),
                                   trainable=False)
    self.tower = user_tower
    self.history_length = int(history_length)

  def _rows(self, user):
    return (tf.gather(self.seen_splits, user),
            tf.gather(self.seen_splits, user + 1))

  def _stored_history(self, user):
    """[batch, history_length] the users' latest books, most recent first."""
    start, end = self._rows(user)
    offsets = (end[:, None] - 1
               - tf.range(self.history_length, dtype=tf.int64)[None, :])
    valid = offsets >= start[:, None]
    books = tf.gather(self.seen_items, tf.maximum(offsets, 0))
    return tf.cast(tf.where(valid, books, 0), tf.int64)

  def _embed(self, user_id, history):
    user = self.user_lookup(user_id)
    looked_up = self.item_lookup(history)
    given = compact_history(looked_up, self.history_length)
    use_given = tf.reduce_any(given != 0, axis=1)
    stored = self._stored_history(user)
    hist = tf.where(use_given[:, None], given, stored)
    known = tf.logical_or(user != 0, use_given)
    embedding, _ = self.tower({
        "user_id": tf.cast(tf.gather(self.user_id_index, user), tf.int64),
        "history": hist})
    if self.tower_scale is None:
      return {"embedding": embedding, "known": known}
    # A blend: EASE reads every known book (the given history replaces the
    # stored books, as it does for the towers).
    stored_books = self._books(user)
    width = tf.maximum(tf.shape(looked_up)[1], tf.shape(stored_books)[1])
    pad = lambda x: tf.pad(x, [[0, 0], [0, width - tf.shape(x)[1]]])  # noqa: E731
    books = tf.where(use_given[:, None], pad(tf.cast(looked_up, tf.int64)),
                     pad(stored_books))
    return {"embedding": embedding * self.tower_scale, "known": known,
            "books": books}

  def _books(self, user):
    """[batch, longest] the users' stored books (corpus indices, 0 = pad)."""
    start, end = self._rows(user)
    rows = tf.RaggedTensor.from_row_lengths(
        tf.gather(self.seen_items, tf.ragged.range(start, end).flat_values),
        end - start)
    return tf.cast(rows.to_tensor(0), tf.int64)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, "user_id")])
  def serving_default(self, user_id):
    return self._embed(user_id, tf.fill([tf.shape(user_id)[0], 1], ""))

  @tf.function(input_signature=[
      tf.TensorSpec([None], tf.string, "user_id"),
      tf.TensorSpec([None, None], tf.string, "history")])
  def with_history(self, user_id, history):
    return self._embed(user_id, history)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, "user_id")])
  def seen(self, user_id):
    """[batch, longest] the users' known books (corpus indices, 0 = pad)."""
    return {"items": tf.cast(self._books(self.user_lookup(user_id)),
                             tf.int32)}


def user_seen(events: pd.DataFrame, num_users: int
              ) -> tuple[np.ndarray, np.ndarray]:
  """Every user's known books as a ragged array: (items, row splits).

  Args:
    events: ingest's events (sorted by user, then time) that serving
      knows: training, validation and test.
    num_users: users 1..num_users; row 0 is the unknown user (empty).

  Returns:
    items: [events] int32 corpus indices, each user's in time order.
    splits: [num_users + 2] int64; user u's books are
      items[splits[u]:splits[u + 1]].
  """
  user = events["user"].to_numpy(np.int64)
  splits = np.searchsorted(user, np.arange(num_users + 2), "left")
  return _int32(events["item"].to_numpy(), "corpus indices"), splits.astype(
      np.int64)


class CandidateModule(tf.Module):
  """Raw book metadata -> candidate embeddings."""

  def __init__(self, preprocessor, item_tower, id_table):
    super().__init__()
    self.preprocessor = preprocessor
    self.tower = item_tower
    self.id_table = tf.Variable(id_table, trainable=False)

  @tf.function(input_signature=[
      tf.TensorSpec([None], tf.string, "parent_asin"),
      tf.TensorSpec([None], tf.string, "title"),
      tf.TensorSpec([None], tf.string, "author"),
      tf.TensorSpec([None, None], tf.string, "categories"),
      tf.TensorSpec([None], tf.float32, "average_rating"),
      tf.TensorSpec([None], tf.float32, "rating_number"),
      tf.TensorSpec([None], tf.float32, "price")])
  def serving_default(self, parent_asin, title, author, categories,
                      average_rating, rating_number, price):
    raw = {"parent_asin": parent_asin, "title": title, "author": author,
           "categories": categories, "average_rating": average_rating,
           "rating_number": rating_number, "price": price}
    x = self.preprocessor(raw)
    x["id"] = tf.gather(self.id_table, x.pop("item"))
    embedding, _ = self.tower(x)
    return {"embedding": embedding}


def _drop_excluded(ids, scores, exclude, k):
  """Removes `exclude`d identifiers per row and keeps the best k left."""
  hit = tf.reduce_any(ids[:, :, None] == exclude[:, None, :], axis=-1)
  # ScaNN pads with NaN scores when its searched leaves hold too few books.
  hit = tf.logical_or(hit, tf.logical_or(ids == "",
                                         tf.logical_not(tf.math.is_finite(scores))))
  scores = tf.where(hit, tf.constant(-np.inf, scores.dtype), scores)
  order = tf.argsort(scores, axis=1, direction="DESCENDING", stable=True)[:, :k]
  ids = tf.gather(ids, order, batch_dims=1)
  scores = tf.gather(scores, order, batch_dims=1)
  return tf.where(tf.math.is_finite(scores), ids, ""), scores


def best_per_book(scores, rows):
  """Keeps each book's best score in each row (the others become -inf).

  Several query vectors per user retrieve their top books each; a book that
  more than one vector found counts once, with its best score (a book's
  score for the user is its best over the vectors). NaN scores (ScaNN's
  padding) become -inf.

  Args:
    scores: [batch, n] scores.
    rows: [batch, n] the books (corpus indices) they score.
  """
  scores = tf.where(tf.math.is_nan(scores),
                    tf.constant(-np.inf, scores.dtype), scores)
  by_score = tf.argsort(scores, axis=1, direction="DESCENDING", stable=True)
  books = tf.gather(rows, by_score, batch_dims=1)
  # Grouped by book, best score first within a group (a stable sort).
  by_book = tf.argsort(books, axis=1, stable=True)
  grouped = tf.gather(books, by_book, batch_dims=1)
  repeat = tf.concat([tf.zeros_like(grouped[:, :1], tf.bool),
                      grouped[:, 1:] == grouped[:, :-1]], axis=1)
  # Back to score order, then to the input's order (inverse permutations).
  for order in (by_book, by_score):
    repeat = tf.gather(repeat, tf.argsort(order, axis=1), batch_dims=1)
  return tf.where(repeat, tf.constant(-np.inf, scores.dtype), scores)


def _popular(ids, scores, k, n):
  return (tf.tile(ids[None, :k], [n, 1]), tf.tile(scores[None, :k], [n, 1]))


class _Retrieval(tf.Module):
  """A top-k layer over the corpus, exclusions and the popularity fallback.

  The layer's identifiers are corpus indices; answers carry parent_asins.

  With `blend` (EASE's tables, model.ease.sparse_rows, values already
  weighted) a book's score is the towers' plus EASE's for the user's
  `books`. `exact`: over the whole corpus (brute force); else the layer's
  top books and EASE's own top `retrieve` books, re-scored exactly (the
  corpus `vectors` are kept for that).
  """

  def __init__(self, layer, asins, popular_ids, popular_scores, k, retrieve,
               blend=None, vectors=None, exact: bool = True):
    super().__init__()
    self.layer = layer
    # asins[0] = "" (no book): corpus index i is asins[i].
    self.asins = tf.constant(np.concatenate([[""], np.asarray(asins, str)]))
    self.popular_ids = tf.constant(popular_ids)
    self.popular_scores = tf.constant(popular_scores, tf.float32)
    self.k, self.retrieve = k, retrieve
    self.blended = blend is not None
    if self.blended:
      self.ease_columns = tf.Variable(blend[0], trainable=False)
      self.ease_values = tf.Variable(blend[1], trainable=False)
      # Row i - 1 is corpus index i.
      self.vectors = tf.Variable(np.asarray(vectors, np.float32),
                                 trainable=False)
      self.exact = exact
      # parent_asin -> corpus index, to leave excluded books out before
      # the top books are taken (EASE ranks a user's read books high).
      self.rows = tf.lookup.StaticHashTable(
          tf.lookup.KeyValueTensorInitializer(
              self.asins[1:], tf.range(1, len(asins) + 1, dtype=tf.int64)),
          default_value=0)

  def _tower_scores(self, embedding, rows):
    """[batch, n] a book's best inner product over the user's vectors, for
    the books `rows` ([batch, n] corpus indices, or None: every book)."""
    query = embedding if embedding.shape.rank == 3 else embedding[:, None]
    query = tf.cast(query, tf.float32)
    if rows is None:
      scores = tf.einsum("bkd,nd->bkn", query, self.vectors)
    else:
      scores = tf.einsum("bkd,bnd->bkn", query,
                         tf.gather(self.vectors, rows - 1))
    return tf.reduce_max(scores, axis=1)

  def _blend_search(self, embedding, books, exclude):
    """(scores, rows) of a blend: towers + EASE (see the class). EASE
    scores a user's read books high (they are read together), so the
    excluded books are left out before the top books are taken."""
    n = tf.shape(self.vectors)[0]
    ease = ease_lib.scores(self.ease_columns, self.ease_values, books, n)
    excluded = self.rows.lookup(exclude)
    batch = tf.shape(excluded, out_type=tf.int64)[0]
    hit = tf.stack([tf.broadcast_to(tf.range(batch)[:, None],
                                    tf.shape(excluded, tf.int64)),
                    excluded], axis=-1)
    hit = tf.scatter_nd(tf.reshape(hit, [-1, 2]),
                        tf.ones(tf.size(excluded), tf.bool),
                        tf.stack([batch, tf.cast(n, tf.int64) + 1]))
    ease = tf.where(hit, tf.constant(-np.inf, ease.dtype), ease)[:, 1:]
    if self.exact:
      scores, top = tf.math.top_k(self._tower_scores(embedding, None) + ease,
                                  k=self.retrieve)
      return scores, top + 1
    found, rows = self._layer_search(embedding)
    _, ease_top = tf.math.top_k(ease, k=self.retrieve)
    rows = tf.cast(rows, tf.int32)
    # ScaNN's padding (NaN scores) holds no book.
    rows = tf.where(tf.math.is_nan(found) | (rows < 1) | (rows > n),
                    tf.zeros_like(rows), rows)
    rows = tf.concat([rows, ease_top + 1], axis=1)
    safe = tf.maximum(rows, 1)
    scores = (self._tower_scores(embedding, safe)
              + tf.gather(ease, safe - 1, batch_dims=1))
    scores = tf.where(rows > 0, scores, tf.constant(-np.inf, scores.dtype))
    # A book both found counts once.
    return best_per_book(scores, rows), rows

  def _layer_search(self, embedding):
    """(scores, rows): the layer's top books for [batch, dim] embeddings,
    or for [batch, interests, dim] each vector's top books side by side
    with a book's repeats at -inf (`best_per_book`)."""
    if embedding.shape.rank == 3:
      shape = tf.shape(embedding)
      scores, rows = self.layer(tf.reshape(embedding, [-1, shape[2]]),
                                k=self.retrieve)
      # [batch, interests x retrieve]: every vector's books side by side.
      rows = tf.reshape(rows, [shape[0], -1])
      return best_per_book(tf.reshape(scores, [shape[0], -1]), rows), rows
    return self.layer(embedding, k=self.retrieve)

  def _answer(self, embedding, known, exclude, books=None):
    """`embedding`: [batch, dim] or, for a model with several interests,
    [batch, interests, dim]: each retrieves its top books and a book scores
    its best over them (exact for brute force: a book in the top k by its
    best score is in the top k of the vector that gives it). `books`: a
    blend's known books per user (corpus indices, 0 = pad)."""
    if self.blended:
      scores, rows = self._blend_search(embedding, books, exclude)
    else:
      scores, rows = self._layer_search(embedding)
    ids = tf.gather(self.asins, tf.cast(rows, tf.int32))
    ids, scores = _drop_excluded(ids, scores, exclude, self.k)
    pop_ids, pop_scores = _popular(self.popular_ids, self.popular_scores,
                                   self.k, tf.shape(ids)[0])
    known = known[:, None]
    shape = [None, self.k]
    return {"parent_asin": tf.ensure_shape(tf.where(known, ids, pop_ids), shape),
            "scores": tf.ensure_shape(tf.where(known, scores, pop_scores),
                                      shape)}


class IndexModule(_Retrieval):
  """embedding (+ exclusions) -> top-k parent_asins and scores; holds no
  per-user state (the query comes from the serving model's `query`).

  The embedding is [batch, dim], or [batch, interests, dim] for a model
  with several interests (`interests` > 1).
  """

  def __init__(self, *args, interests: int = 1, **kwargs):
    super().__init__(*args, **kwargs)
    shape = [None, None] if interests == 1 else [None, interests, None]
    spec = [tf.TensorSpec(shape, tf.float32, "embedding"),
            tf.TensorSpec([None], tf.bool, "known"),
            tf.TensorSpec([None, None], tf.string, "exclude")]
    if self.blended:
      # The query's `books`: what EASE reads.
      spec.append(tf.TensorSpec([None, None], tf.int64, "books"))
    self.search = tf.function(self._answer, input_signature=spec)


class ServingModule(_Retrieval):
  """The self-contained model: user_id (+ history, exclusions) -> top-k.

  `serving_default` excludes the books the user is known to have read (as
  `tt-mimic serve` does by default); `with_history` excludes exactly the
  given `exclude` list; `query` returns the user embedding.
  """

  def __init__(self, query, layer, asins, popular_ids, popular_scores, k,
               retrieve, **kwargs):
    super().__init__(layer, asins, popular_ids, popular_scores, k, retrieve,
                     **kwargs)
    self.query = query

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, "user_id")])
  def serving_default(self, user_id):
    q = self.query.serving_default(user_id)
    seen = tf.gather(self.asins, self.query.seen(user_id)["items"])
    return self._answer(q["embedding"], q["known"], seen, q.get("books"))

  @tf.function(input_signature=[
      tf.TensorSpec([None], tf.string, "user_id"),
      tf.TensorSpec([None, None], tf.string, "history"),
      tf.TensorSpec([None, None], tf.string, "exclude")])
  def with_history(self, user_id, history, exclude):
    q = self.query.with_history(user_id, history)
    return self._answer(q["embedding"], q["known"], exclude, q.get("books"))

  @tf.function(input_signature=[
      tf.TensorSpec([None], tf.string, "user_id"),
      tf.TensorSpec([None, None], tf.string, "history")])
  def query_embedding(self, user_id, history):
    return self.query.with_history(user_id, history)


def _signatures(module):
  if isinstance(module, IndexModule):
    return {"serving_default": module.search}
  out = {"serving_default": module.serving_default}
  if hasattr(module, "with_history"):
    out["with_history"] = module.with_history
  if hasattr(module, "query_embedding"):
    out["query"] = module.query_embedding
  return out


STAGED_SERVING = "serving_model"  # where build_indexes saves it


def build_indexes(query, embeddings: np.ndarray, identifiers: np.ndarray,
                  popularity: np.ndarray, config: ExportConfig,
                  directory: str, queries: np.ndarray | None = None,
                  blend: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
  """Builds, saves and cross-checks the serving model and the ScaNN index.

  Args:
    query: a QueryModule (or the `query` of a loaded serving model).
    embeddings: [n, dim] candidate embeddings (corpus index i + 1 = row i).
    identifiers: [n] parent_asins.
    popularity: [n] training counts, for the unknown-user fallback.
    config: sizes and ScaNN parameters.
    directory: where `serving_model/` (the self-contained brute-force
      model, for the caller to move to `serving_path`) and `index_scann/`
      are written.
    queries: [m, dim] user embeddings to measure ScaNN against brute force
      (default: a sample of the candidate embeddings); [m, interests, dim]
      for a model with several interests (the index then takes that shape).
    blend: EASE's (columns, values) when `query` is a blend's
      (model.ease.Blend): both indexes then add EASE's scores; brute force
      exactly, ScaNN by re-scoring its top books and EASE's.

  Returns:
    Sizes, ScaNN parameters, every ScaNN build's agreement with brute force.
  """
  n = len(identifiers)
  k = min(config.k, n)
  retrieve = min(config.k + config.max_exclusions, n)
  rows = tf.range(1, n + 1, dtype=tf.int32)
  vectors = tf.constant(embeddings, tf.float32)
  order = np.argsort(-popularity, kind="stable")[:k]
  total = max(float(popularity.sum()), 1.0)
  pop_ids, pop_scores = identifiers[order].astype(str), popularity[order] / total
  brute = tfrs.layers.factorized_top_k.BruteForce(k=retrieve)
  brute.index(vectors, rows)
  blended = {} if blend is None else {"blend": blend, "vectors": embeddings}
  # A blend's serving model scores the corpus itself (no brute-force layer).
  serving = ServingModule(query, None if blend else brute, identifiers,
                          pop_ids, pop_scores, k, retrieve, **blended)
  _save(serving, os.path.join(directory, STAGED_SERVING))
  interests = 1 if queries is None or np.ndim(queries) == 2 else int(
      np.shape(queries)[1])
  info = {"k": k, "retrieve": retrieve, "items": n, "interests": interests}
  if not HAVE_SCANN:
    logging.warning("scann is not importable; index_scann is not exported.")
    return info
  params = scann_params(n, dataclasses.replace(config, k=k))
  # ScaNN's agreement is measured per query vector.
  queries = vectors if queries is None else tf.constant(
      np.reshape(queries, [-1, np.shape(queries)[-1]]), tf.float32)
  scann_layer, info["scann_tuning"] = _tuned_scann(vectors, rows, queries,
                                                   params, k, retrieve, brute,
                                                   config)
  info["scann"] = info["scann_tuning"][-1]["params"]
  info["scann_agreement_at_k"] = info["scann_tuning"][-1]["agreement_at_k"]
  info["scann_build_seconds"] = round(sum(
      t["build_seconds"] for t in info["scann_tuning"]), 2)
  scann_module = IndexModule(scann_layer, identifiers, pop_ids, pop_scores, k,
                             retrieve, interests=interests, exact=False,
                             **blended)
  _save(scann_module, os.path.join(directory, "index_scann"),
        SCANN_SAVE_OPTIONS)
  return info


def _tuned_scann(vectors, ids, queries, params, k, retrieve, brute, config):
  """Builds ScaNN with `params`; while its top-k agreement with brute force
  on `queries` is below `config.scann_min_recall` and the searched leaves
  were chosen automatically, doubles them and rebuilds.

  Returns the layer and one record per build (params, agreement, seconds).
  """
  tuning = []
  # The exact top-k of the query sample, once for every build.
  sample = _query_sample(queries)
  exact = brute(sample, k=k)[1].numpy()
  while True:
    start = time.monotonic()
    logging.info("Building the ScaNN index over %d books (%s) ...",
                 int(vectors.shape[0]), params)
    layer = tfrs.layers.factorized_top_k.ScaNN(
        k=retrieve, distance_measure="dot_product", **params)
    layer.index(vectors, ids)
    seconds = time.monotonic() - start
    value = _overlap(exact, layer(sample, k=k)[1].numpy(), k)
    tuning.append({"params": dict(params), "agreement_at_k": value,
                   "build_seconds": round(seconds, 2)})
    logging.info("ScaNN built in %.1f s; top-%d agreement with brute force "
                 "%.4f (at least %.2f wanted)", seconds, k, value,
                 config.scann_min_recall)
    search, leaves = params["num_leaves_to_search"], params["num_leaves"]
    if (value >= config.scann_min_recall or config.scann_leaves_to_search
        or search >= leaves):
      if value < config.scann_min_recall:
        logging.warning("ScaNN agreement %.4f stays below %.2f with %s.",
                        value, config.scann_min_recall, params)
      return layer, tuning
    params = {**params, "num_leaves_to_search": min(leaves, 2 * search)}


def agreement(vectors, exact, approximate, k, sample: int = 1000) -> float:
  """Mean share of the exact top-k found by the approximate index.

  Args:
    vectors: [m, dim] queries; a sample of `sample` rows is used.
    exact, approximate: top-k layers, called as layer(queries, k=k).
    k: the cut-off.
  """
  q = _query_sample(vectors, sample)
  return _overlap(exact(q, k=k)[1].numpy(), approximate(q, k=k)[1].numpy(), k)


def _query_sample(vectors, sample: int = 1000) -> tf.Tensor:
  """`sample` rows of `vectors` (the same ones for the same inputs)."""
  rng = np.random.default_rng(0)
  rows = rng.choice(int(vectors.shape[0]), min(sample, int(vectors.shape[0])),
                    replace=False)
  return tf.gather(vectors, rows)


def _overlap(exact_ids: np.ndarray, approximate_ids: np.ndarray,
             k: int) -> float:
  return float(np.mean([len(set(x) & set(y)) / k
                        for x, y in zip(exact_ids, approximate_ids)]))


def _save(module, path, options=None):
  start = time.monotonic()
  logging.info("Saving %s ...", path)
  if os.path.exists(path):
    shutil.rmtree(path)
  tf.saved_model.save(module, path, signatures=_signatures(module),
                      options=options)
  logging.info("Saved %s in %.1f s", path, time.monotonic() - start)


def provenance(model_dir: str, prep: pipeline.Prepared, model: str) -> dict:
  """Where an export comes from: package version, the model (the variant
  exported), the run's resolved config, its test metrics (without
  segments) and the input files."""
  out = {"package_version": tt_mimic.__version__,
         "model": model,
         "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         # The ingest key hashes the inputs' path, size and mtime with the
         # ingest settings (ingest.cache_key).
         "ingest_key": os.path.basename(prep.data.directory or ""),
         "inputs": {k: prep.data.report.get("config", {}).get(k)
                    for k in ("books_csv", "users_csv")},
         "fitted_on_splits": list(prep.fit_splits)}
  for name, key in (("config.json", "config"), ("metrics.json", "metrics")):
    path = os.path.join(model_dir, name)
    if os.path.exists(path):
      with open(path) as f:
        out[key] = json.load(f)
  for values in out.get("metrics", {}).values():
    values.pop("segments", None)
  return out


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


def _size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(path) for f in files)


def write_models_config(directory: str, name: str = "tt_mimic") -> None:
  """`<export>/models.config`: TensorFlow Serving's model config for
  serving/ (it serves the highest version and picks up new ones)."""
  base = os.path.abspath(os.path.join(directory, recommend.SERVING))
  with open(os.path.join(directory, "models.config"), "w") as f:
    f.write("model_config_list {\n  config {\n"
            f'    name: "{name}"\n    base_path: "{base}"\n'
            '    model_platform: "tensorflow"\n  }\n}\n')


def export_run(model_dir: str, prep: pipeline.Prepared, built: pipeline.Built,
               config: ExportConfig = ExportConfig(), *, model: str) -> str:
  """Exports `built`, the trained model `model` of a run (as
  `pipeline.exported_variant` names it); returns the export directory."""
  directory = os.path.join(model_dir, "export")
  os.makedirs(directory, exist_ok=True)
  data = prep.data
  seen_items, seen_splits = user_seen(data.events, len(data.users))
  blend = built.blend
  query = QueryModule(built.user_tower, data.users, data.items["parent_asin"],
                      prep.user_id_index, seen_items, seen_splits,
                      prep.feature_config.history_length,
                      None if blend is None else blend.tower_scale)
  candidate = CandidateModule(prep.preprocessor, built.item_tower,
                              prep.item_table["id"])
  _save(candidate, os.path.join(directory, "candidate"))
  embeddings = pipeline.item_embeddings(built.encoder, len(data.items))[1:]
  items = data.items[["parent_asin", "title", "author", "categories",
                      "average_rating", "rating_number", "price",
                      "train_count"]].copy()
  items.to_parquet(os.path.join(directory, "items.parquet"))
  np.save(os.path.join(directory, "embeddings.npy"), embeddings)
  seen = pd.DataFrame({
      "userId": data.users[data.events["user"].to_numpy() - 1],
      "parent_asin": data.items["parent_asin"].to_numpy()[
          data.events["item"].to_numpy() - 1]})
  seen.to_parquet(os.path.join(directory, "seen.parquet"))
  sample = np.random.default_rng(0).choice(
      len(data.users), min(1000, len(data.users)), replace=False)
  queries = query.serving_default(
      tf.constant(data.users[sample].astype(str)))["embedding"].numpy()
  _remove(os.path.join(directory, STAGED_SERVING))
  info = build_indexes(
      query, embeddings, items["parent_asin"].to_numpy(),
      items["train_count"].to_numpy(np.float64), config, directory, queries,
      None if blend is None else (blend.columns, blend.values))
  if blend is not None:
    info["blend"] = blend.info
  # Versions of the earlier export (catalog's, and the old layout's
  # directories) belong to another model: removed only now, so that a
  # server keeps answering from them while this export is built.
  for name in ("CURRENT", "versions", recommend.SERVING, "query",
               "index_brute_force"):
    _remove(os.path.join(directory, name))
  os.makedirs(os.path.join(directory, recommend.SERVING))
  os.rename(os.path.join(directory, STAGED_SERVING),
            recommend.serving_path(directory, 1))
  write_models_config(directory)
  info["bytes_on_disk"] = {
      name: _size(os.path.join(directory, name))
      for name in (recommend.SERVING, "index_scann", "candidate",
                   "items.parquet", "embeddings.npy", "seen.parquet")}
  info["per_user_tables"] = {"users": int(len(data.users)),
                             "known_events": int(len(seen_items)),
                             "bytes": int(seen_items.nbytes + seen_splits.nbytes
                                          + 4 * (len(data.users) + 1))}
  info["history_length"] = prep.feature_config.history_length
  info["provenance"] = provenance(model_dir, prep, model)
  with open(os.path.join(directory, "export.json.tmp"), "w") as f:
    json.dump(info, f, indent=2)
  # Written last and atomically: a server polling the export reloads once.
  os.replace(os.path.join(directory, "export.json.tmp"),
             os.path.join(directory, "export.json"))
  logging.info("Exported %s", directory)
  return directory
