"""A tiny model on a "small" tiny_data dataset, for the model-level tests.

`shared_prep()` ingests and prepares one dataset per process (on first
use); `build(...)` builds a tower pair and DAT model on it with the tiny
`TOWER` sizes. Shared by tests/model (towers, DAT model), tests/data
(features) and tests/serving (the export modules).
"""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import tempfile

import numpy as np

import tt_mimic  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from tt_mimic.config import LossConfig
from tt_mimic.config import TowerConfig
from tt_mimic.data import features
from tt_mimic.data import pipeline as data_lib
from tt_mimic.model import towers
from tt_mimic.training import pipeline

import tiny_data

# One query vector: the tests of several (--interests) ask for them.
TOWER = TowerConfig(embedding_dim=8, hidden_units=(16,), output_dim=8,
                    interests=1)

_SHARED = {}


def shared_prep() -> pipeline.Prepared:
  """One prepared "small" dataset per process (built on first use)."""
  if "prep" not in _SHARED:
    directory = tempfile.mkdtemp(prefix="tt_mimic_tiny_model_")
    atexit.register(shutil.rmtree, directory, True)
    _SHARED["prep"] = tiny_data.prepared(directory)
  return _SHARED["prep"]


def build(use_amm=True, loss="softmax", use_cal=True, interests=1,
          amm_mimic_only=False, **loss_kwargs):
  """(prep, built): `pipeline.build` on `shared_prep()`, variables made."""
  prep = shared_prep()
  built = pipeline.build(
      prep, dataclasses.replace(TOWER, use_amm=use_amm, interests=interests,
                                amm_mimic_only=amm_mimic_only),
      LossConfig(loss=loss, use_cal=use_cal, **loss_kwargs))
  built.model.compute_loss(pipeline.dummy_batch(prep))  # creates variables
  return prep, built


def user_tower(prep, built, **config) -> towers.UserTower:
  """A fresh user tower with TOWER's sizes changed by `config`, on `built`'s
  item table."""
  sizes = prep.vocab.sizes()
  return towers.UserTower(
      sizes, dataclasses.replace(TOWER, **config), built.user_tower.table,
      towers.ItemFeatureEmbedding(sizes, TOWER.embedding_dim))


def train_batch(prep, size=48):
  """The first training batch of `prep` (seeded)."""
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
  """assertUnitNorm for tf.test.TestCase classes."""

  def assertUnitNorm(self, x, dim=TOWER.output_dim):
    x = np.asarray(x)
    self.assertEqual(x.shape[-1], dim)
    self.assertTrue(np.all(np.isfinite(x)), x)
    self.assertAllClose(np.linalg.norm(x, axis=-1), np.ones(x.shape[0]),
                        atol=1e-5)
