"""Tests for tt_mimic.data.features: numeric statistics, the item
preprocessor and the item table, by hand and through ingest."""

import json
import os
import types

from absl.testing import parameterized
import numpy as np
import pandas as pd

import tt_mimic  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from tt_mimic.config import FeatureConfig
from tt_mimic.config import TrainConfig
from tt_mimic.data import features
from tt_mimic.data import ingest
from tt_mimic.training import pipeline

import tiny_data
from tiny_model import raw_books

NUMERIC_WIDTH = 2 * len(features.NUMERIC_COLUMNS)


class ItemPreprocessorTest(tf.test.TestCase):

  CONFIG = FeatureConfig(title_length=4, max_categories=3)

  def items(self):
    # average_rating: training books (train_count > 0) have 4, 2 and NaN ->
    #   mean 3, variance 1.
    # rating_number (log1p): training values 0, 99, 9 -> 0, 2 ln10, ln10;
    #   mean ln10, variance (ln10^2 + ln10^2 + 0) / 3 = 2/3 ln10^2.
    # price: missing for every book -> mean 0, variance 1.
    return pd.DataFrame({
        "parent_asin": ["A", "B", "C", "D"],
        "title": ["Night Case", "Star", "", "Night"],
        "author": ["Ann", "Bob", "", "Ann"],
        "categories": [["Books", "Mystery", "Thrillers"], ["Books", "SF"], [],
                       ["Books", "Mystery"]],
        "average_rating": [4.0, 2.0, np.nan, 3.0],
        "rating_number": [0.0, 99.0, 9.0, 5.0],
        "price": [np.nan] * 4,
        "train_count": [3, 2, 1, 0]})

  def test_numeric_stats(self):
    means, variances = features.numeric_stats(self.items())
    ln10 = np.log(10.0)
    self.assertAllClose(means, [3.0, ln10, 0.0])
    self.assertAllClose(variances, [1.0, 2.0 / 3.0 * ln10 ** 2, 1.0])
    self.assertEqual(means.dtype, np.float32)

  def test_numeric_stats_single_value_and_constant_columns(self):
    items = self.items().assign(average_rating=[4.0, np.nan, np.nan, np.nan],
                                rating_number=[5.0, 5.0, 5.0, 1.0])
    means, variances = features.numeric_stats(items)
    self.assertAllClose(means, [4.0, np.log(6.0), 0.0])
    self.assertAllClose(variances, [1.0, 1.0, 1.0])

  def preprocessor(self, items):
    means, variances = features.numeric_stats(items)
    return features.ItemPreprocessor(
        ["A", "B", "C", "D"], ["Ann"], ["Mystery", "Mystery > Thrillers", "SF"],
        ["Mystery", "SF"], ["night", "case", "star"], means, variances,
        self.CONFIG)

  def test_numerics_missing_flags_and_normalization(self):
    p = self.preprocessor(self.items())
    raw = raw_books(
        parent_asin=["A", "Z", "D"], title=["Night, CASE!", "", "moon star"],
        author=["Ann", "Zed", ""],
        categories=[["Mystery", "Mystery > Thrillers"], ["", ""], ["SF", ""]],
        average_rating=[5.0, np.nan, -2.0],
        rating_number=[999.0, np.nan, np.inf],
        price=[7.0, np.nan, np.nan])
    x = p(raw)
    # Row 0: (5 - 3) / 1 = 2; (ln 1000 - ln10) / sqrt(2/3 ln10^2) = sqrt(6);
    #   price (ln 8 - 0) / 1 = ln 8 (a value never seen in training).
    # Rows 1, 2: NaN, negative and infinite are missing -> 0, flag 1.
    self.assertAllClose(x["numeric"], [
        [2.0, np.sqrt(6.0), np.log(8.0), 0, 0, 0],
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1]], atol=1e-5)
    self.assertAllEqual(x["item"], [1, 0, 4])
    self.assertAllEqual(x["author"], [2, 1, 0])
    self.assertAllEqual(x["categories"], [[2, 3, 0], [0, 0, 0], [4, 0, 0]])
    self.assertAllEqual(x["cal_category"], [1, 0, 2])
    self.assertAllEqual(x["title"], [[2, 3, 0, 0], [0, 0, 0, 0],
                                     [1, 4, 0, 0]])

  def test_all_missing_numerics_in_the_item_table(self):
    items = self.items().assign(average_rating=np.nan, rating_number=np.nan)
    means, variances = features.numeric_stats(items)
    self.assertAllEqual(means, [0.0, 0.0, 0.0])
    self.assertAllEqual(variances, [1.0, 1.0, 1.0])
    table = features.build_item_table(items, self.preprocessor(items),
                                      self.CONFIG)
    numeric = table["numeric"]
    self.assertEqual(numeric.shape, (5, NUMERIC_WIDTH))
    self.assertTrue(np.all(np.isfinite(numeric)))
    self.assertAllEqual(numeric[0], np.zeros(NUMERIC_WIDTH))  # padding row
    self.assertAllEqual(numeric[1:], np.tile([0, 0, 0, 1, 1, 1], (4, 1)))
    # Only books seen in training keep an item-id embedding.
    self.assertAllEqual(table["id"], [0, 1, 2, 3, 0])

  def test_empty_numeric_columns_through_ingest(self):
    directory = self.get_temp_dir()
    prep = tiny_data.prepared(directory, empty_numerics=True)
    self.assertAllEqual(prep.vocab.means, [0, 0, 0])
    self.assertAllEqual(prep.vocab.variances, [1, 1, 1])
    numeric = prep.item_table["numeric"][1:]
    self.assertAllEqual(numeric, np.tile([0, 0, 0, 1, 1, 1],
                                         (len(numeric), 1)))

  def test_unseen_top_category_maps_to_zero(self):
    p = self.preprocessor(self.items())
    raw = raw_books(parent_asin=["A"], title=["x"], author=["Ann"],
                    categories=[["Poetry", "Poetry > Haiku"]],
                    average_rating=[1.0], rating_number=[1.0], price=[1.0])
    self.assertAllEqual(p(raw)["cal_category"], [0])

  def test_item_table_with_category_only_outside_training(self):
    items = self.items()
    items.at[3, "categories"] = ["Books", "Poetry"]  # train_count 0
    vocab_items = items.copy()
    means, variances = features.numeric_stats(items)
    tops = features._top_k(
        pd.Series([features.top_category(c) for c in items["categories"]]),
        items["train_count"].to_numpy(), 0)
    self.assertNotIn("Poetry", tops)
    p = features.ItemPreprocessor(
        vocab_items["parent_asin"], ["Ann"], ["Mystery", "SF", "Poetry"],
        tops, ["night"], means, variances, self.CONFIG)
    table = features.build_item_table(items, p, self.CONFIG)
    self.assertEqual(table["cal_category"][4], 0)


class TitleStandardizeTest(tf.test.TestCase, parameterized.TestCase):
  """--title_standardize reaches the adapted vocabulary, the preprocessor and
  the saved state alike."""

  # "Éléments" precomposed, upper-case and decomposed (E + U+0301).
  TITLES = ["Éléments", "ÉLÉMENTS", "E\u0301le\u0301ments"]

  def data(self):
    """What build_vocabularies and load_vocabularies read of an ingest."""
    items = pd.DataFrame({
        "parent_asin": ["A", "B", "C"], "title": self.TITLES,
        "author": ["Ann"] * 3, "categories": [["Books", "Science"]] * 3,
        "average_rating": [4.0] * 3, "rating_number": [1.0] * 3,
        "price": [np.nan] * 3, "train_count": [1, 1, 1]})
    return types.SimpleNamespace(items=items, users=np.array(["u1"]))

  def title_ids(self, standardize, titles):
    config = FeatureConfig(title_length=2, title_standardize=standardize)
    vocab = features.build_vocabularies(self.data(), config)
    self.assertEqual(vocab.title_standardize, standardize)
    n = len(titles)
    raw = raw_books(parent_asin=["A"] * n, title=titles, author=["Ann"] * n,
                    categories=[["Science"]] * n, average_rating=[4.0] * n,
                    rating_number=[1.0] * n, price=[1.0] * n)
    return list(features.make_preprocessor(vocab, config)(raw)["title"]
                .numpy()[:, 0])

  def test_unicode_makes_one_token_of_every_form(self):
    # Vocabulary ["", "[UNK]", "éléments"]: every form, and "éléments" never
    # seen in training, is token 2.
    self.assertEqual(self.title_ids("unicode", self.TITLES + ["éléments"]),
                     [2, 2, 2, 2])

  def test_ascii_makes_three_tokens_and_misses_the_fourth(self):
    ids = self.title_ids("ascii", self.TITLES + ["éléments"])
    self.assertNotIn(1, ids[:3])  # adapted with the same standardize
    self.assertLen(set(ids[:3]), 3)
    self.assertEqual(ids[3], 1)  # out of vocabulary

  def save(self, standardize):
    data = self.data()
    vocab = features.build_vocabularies(
        data, FeatureConfig(title_standardize=standardize))
    path = os.path.join(self.get_temp_dir(), f"{standardize}.json")
    features.save_vocabularies(vocab, path)
    return data, vocab, path

  def test_saved_state_records_the_standardize(self):
    data, vocab, path = self.save("unicode")
    with open(path, encoding="utf-8") as f:
      self.assertEqual(json.load(f)["title_standardize"], "unicode")
    loaded = features.load_vocabularies(path, data)
    self.assertEqual(loaded.title_standardize, "unicode")
    self.assertEqual(loaded.title_tokens, vocab.title_tokens)
    features.make_preprocessor(loaded,
                               FeatureConfig(title_standardize="unicode"))
    with self.assertRaisesRegex(ValueError, "title_standardize='unicode'"):
      features.make_preprocessor(loaded,
                                 FeatureConfig(title_standardize="ascii"))

  def test_old_state_without_the_key_loads_as_ascii(self):
    data, _, path = self.save("ascii")
    with open(path, encoding="utf-8") as f:
      state = json.load(f)
    del state["title_standardize"]  # as saved before the setting existed
    with open(path, "w", encoding="utf-8") as f:
      json.dump(state, f, ensure_ascii=False)
    loaded = features.load_vocabularies(path, data)
    self.assertEqual(loaded.title_standardize, "ascii")
    features.make_preprocessor(loaded, FeatureConfig(title_standardize="ascii"))
    with self.assertRaisesRegex(ValueError, "title_standardize='ascii'"):
      features.make_preprocessor(loaded,
                                 FeatureConfig(title_standardize="unicode"))

  def test_default_and_choices(self):
    self.assertEqual(FeatureConfig().title_standardize, "unicode")
    with self.assertRaisesRegex(ValueError, "not one of"):
      FeatureConfig(title_standardize="latin")


def test_books_without_any_category_build_valid_layers(tmp_path):
  """A dump whose books are all ["Books"] (no sub-category) must not crash."""
  dataset = tiny_data.write_dataset(tmp_path, "small")
  books = dataset.books.assign(categories='["Books"]', title='[""]')
  books.to_csv(dataset.books_csv, index=False)  # overwritten: the bad dump
  prep = pipeline.prepare(
      ingest.run(dataset.config(min_user_interactions=2,
                                min_item_interactions=2)),
      FeatureConfig(title_length=6, history_length=5),
      TrainConfig(batch_size=64, epochs=1, eval_max_users=100))
  assert prep.vocab.categories == [] and prep.vocab.top_categories == []
  assert (prep.item_table["categories"] == 0).all()
  assert (prep.item_table["cal_category"] == 0).all()
