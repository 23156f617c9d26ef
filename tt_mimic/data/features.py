"""Keras preprocessing for book metadata, and the integer item feature table.

`ItemPreprocessor` holds the preprocessing layers (StringLookup for ids,
authors and categories, TextVectorization for titles, Normalization for
numerics), built from the training split. It maps raw book metadata
(strings and floats, as in books.csv) to integer/float model inputs. It is
run once over the corpus to build the item feature table that training
gathers from by integer id, and it travels inside the exported candidate
SavedModel so serving takes raw strings.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pandas as pd

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tt_mimic.config import BEFORE_SETTING
from tt_mimic.config import FeatureConfig
from tt_mimic.data import ingest
from tt_mimic.data import text

NUMERIC_COLUMNS = ingest.NUMERIC_COLUMNS
LOG_COLUMNS = ("rating_number", "price")  # log1p before normalization
ROOT_CATEGORY = "Books"


def category_tokens(path: list[str], limit: int) -> list[str]:
  """A category path -> its prefixes, without the universal root.

  Example: ["Books", "Mystery", "Thrillers"] -> ["Mystery", "Mystery > Thrillers"].
  """
  levels = [c for c in path if c]
  if levels and levels[0] == ROOT_CATEGORY:
    levels = levels[1:]
  return [" > ".join(levels[:i + 1]) for i in range(len(levels))][:limit]


def top_category(path: list[str]) -> str:
  """The top-level category of a path ('' when there is none)."""
  tokens = category_tokens(path, 1)
  return tokens[0] if tokens else ""


def _top_k(values: pd.Series, weights: np.ndarray, k: int) -> list[str]:
  """The k values with the largest total weight; ties by value, '' excluded."""
  frame = pd.DataFrame({"v": values.to_numpy(), "w": weights})
  frame = frame[frame["v"] != ""]
  totals = frame.groupby("v", sort=True)["w"].sum()
  totals = totals[totals > 0]
  order = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))
  return [v for v, _ in order[:k]] if k else [v for v, _ in order]


def pad_categories(items: pd.DataFrame, limit: int) -> np.ndarray:
  """[num_items, limit] array of category tokens, padded with ''."""
  out = np.full((len(items), limit), "", dtype=object)
  for row, path in enumerate(items["categories"]):
    tokens = category_tokens(list(path), limit)
    out[row, :len(tokens)] = tokens
  return out


def numeric_stats(items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
  """Mean and variance of the (log1p where due) numerics of training books.

  A column with no value in training gets mean 0 and variance 1, so that it
  contributes only its missing indicator and never a NaN.
  """
  train = items[items["train_count"] > 0]
  means, variances = [], []
  for column in NUMERIC_COLUMNS:
    x = train[column].to_numpy(dtype=np.float64)
    x = np.log1p(x) if column in LOG_COLUMNS else x
    x = x[np.isfinite(x)]
    means.append(float(x.mean()) if x.size else 0.0)
    var = float(x.var()) if x.size > 1 else 0.0
    variances.append(var if var > 1e-12 else 1.0)
  return np.array(means, np.float32), np.array(variances, np.float32)


# StringLookup refuses an empty vocabulary (e.g. a dump whose books all have
# the category path ["Books"] only); this placeholder keeps the layers valid.
EMPTY_VOCABULARY_PLACEHOLDER = "[none]"


def _non_empty(vocabulary) -> list[str]:
  vocabulary = list(vocabulary)
  return vocabulary or [EMPTY_VOCABULARY_PLACEHOLDER]


class ItemPreprocessor(tf.keras.layers.Layer):
  """Raw book metadata -> integer ids, token ids and normalized numerics.

  Inputs (a dict of [batch] or [batch, n] tensors): `parent_asin`, `title`,
  `author` (strings), `categories` ([batch, n] strings padded with ''),
  `average_rating`, `rating_number`, `price` (float, NaN = missing).

  Outputs: `item` ([batch] corpus index, 0 = unknown book), `author`
  ([batch], 0 = no author, 1 = rare), `categories` ([batch, max_categories],
  0 = padding), `cal_category` ([batch] top-level category, 0 = none),
  `title` ([batch, title_length], 0 = padding), `numeric`
  ([batch, 2 * len(NUMERIC_COLUMNS)]: normalized values, then missing flags).
  """

  def __init__(self, item_vocab, author_vocab, category_vocab, top_vocab,
               title_vocab, means, variances, config: FeatureConfig,
               **kwargs):
    super().__init__(**kwargs)
    self.config = config
    self.item_lookup = tf.keras.layers.StringLookup(
        vocabulary=list(item_vocab), mask_token=None, num_oov_indices=1)
    self.author_lookup = tf.keras.layers.StringLookup(
        vocabulary=_non_empty(author_vocab), mask_token="", num_oov_indices=1)
    self.category_lookup = tf.keras.layers.StringLookup(
        vocabulary=_non_empty(category_vocab), mask_token="",
        num_oov_indices=1)
    # One OOV index (1), folded into 0 = "no category" in call().
    self.top_lookup = tf.keras.layers.StringLookup(
        vocabulary=_non_empty(top_vocab), mask_token="", num_oov_indices=1)
    self.title_vectorizer = tf.keras.layers.TextVectorization(
        vocabulary=_non_empty(title_vocab),
        output_sequence_length=config.title_length,
        standardize=text.standardizer(config.title_standardize))
    self.normalization = tf.keras.layers.Normalization(
        mean=means, variance=variances)

  def call(self, raw):
    categories = tf.strings.strip(raw["categories"])
    categories = categories[:, :self.config.max_categories]
    pad = self.config.max_categories - tf.shape(categories)[1]
    categories = tf.pad(categories, [[0, 0], [0, pad]], constant_values="")
    top = tf.strings.split(categories[:, 0], " > ").to_tensor(
        default_value="", shape=[None, 1])[:, 0]
    numeric = []
    for column in NUMERIC_COLUMNS:
      x = tf.cast(raw[column], tf.float32)
      x = tf.where(x < 0, tf.constant(np.nan, tf.float32), x)
      numeric.append(tf.math.log1p(x) if column in LOG_COLUMNS else x)
    numeric = tf.stack(numeric, axis=1)
    missing = tf.logical_not(tf.math.is_finite(numeric))
    normalized = self.normalization(tf.where(missing, 0.0, numeric))
    normalized = tf.where(missing, 0.0, normalized)
    return {
        "item": self.item_lookup(raw["parent_asin"]),
        "author": self.author_lookup(tf.strings.strip(raw["author"])),
        "categories": self.category_lookup(categories),
        "cal_category": tf.maximum(self.top_lookup(top) - 1, 0),
        "title": self.title_vectorizer(raw["title"]),
        "numeric": tf.concat([normalized, tf.cast(missing, tf.float32)], 1),
    }


@dataclasses.dataclass
class Vocabularies:
  """Everything the preprocessing layers are built from (training split).

  `title_tokens` are tokens of titles standardized by `title_standardize`
  (`text.STANDARDIZE`); only a preprocessor with the same one may use them.
  """
  items: np.ndarray
  users: np.ndarray
  authors: list[str]
  categories: list[str]
  top_categories: list[str]
  title_tokens: list[str]
  means: np.ndarray
  variances: np.ndarray
  title_standardize: str

  def sizes(self) -> dict:
    """Vocabulary sizes as the lookup layers see them (placeholder included)."""
    return {"items": len(self.items), "users": len(self.users),
            "authors": len(_non_empty(self.authors)),
            "categories": len(_non_empty(self.categories)),
            "top_categories": len(_non_empty(self.top_categories)),
            "title_tokens": len(_non_empty(self.title_tokens))}


def build_vocabularies(data: ingest.Ingested,
                       config: FeatureConfig) -> Vocabularies:
  """Vocabularies and numeric statistics from the training split only."""
  items = data.items
  weight = items["train_count"].to_numpy()
  cats = pad_categories(items, config.max_categories)
  cat_series = pd.Series(cats.ravel())
  category_vocab = _top_k(cat_series, np.repeat(weight, cats.shape[1]),
                          config.category_top_k)
  tops = pd.Series([top_category(list(p)) for p in items["categories"]])
  top_vocab = _top_k(tops, weight, 0)
  author_vocab = _top_k(pd.Series(items["author"].to_numpy()), weight,
                        config.author_top_k)
  vectorizer = tf.keras.layers.TextVectorization(
      max_tokens=config.title_max_tokens,
      standardize=text.standardizer(config.title_standardize))
  train_titles = items.loc[weight > 0, "title"].to_numpy(dtype=str)
  vectorizer.adapt(tf.constant(train_titles if train_titles.size else [""]))
  title_vocab = [t for t in vectorizer.get_vocabulary() if t not in ("", "[UNK]")]
  means, variances = numeric_stats(items)
  return Vocabularies(items=items["parent_asin"].to_numpy(dtype=object),
                      users=data.users, authors=author_vocab,
                      categories=category_vocab, top_categories=top_vocab,
                      title_tokens=title_vocab, means=means,
                      variances=variances,
                      title_standardize=config.title_standardize)


_SAVED_VOCABULARIES = ("authors", "categories", "top_categories",
                       "title_tokens", "means", "variances",
                       "title_standardize")


def save_vocabularies(vocab: Vocabularies, path: str) -> None:
  """Writes the adapted state (not the id lists, which ingest stores)."""
  state = {name: np.asarray(getattr(vocab, name)).tolist()
           for name in _SAVED_VOCABULARIES}
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(state, f, ensure_ascii=False)
  os.replace(path + ".tmp", path)


def load_vocabularies(path: str, data: ingest.Ingested) -> Vocabularies:
  """`build_vocabularies`' result from its saved state: nothing re-adapted.

  A state saved before `title_standardize` existed was adapted with the
  standardize of that time (`config.BEFORE_SETTING`), and loads as such.
  """
  with open(path, encoding="utf-8") as f:
    state = json.load(f)
  return Vocabularies(
      items=data.items["parent_asin"].to_numpy(dtype=object),
      users=data.users, authors=state["authors"],
      categories=state["categories"], top_categories=state["top_categories"],
      title_tokens=state["title_tokens"],
      means=np.asarray(state["means"], np.float32),
      variances=np.asarray(state["variances"], np.float32),
      title_standardize=state.get("title_standardize",
                                  BEFORE_SETTING["title_standardize"]))


def make_preprocessor(vocab: Vocabularies,
                      config: FeatureConfig) -> ItemPreprocessor:
  """The preprocessor of `vocab`.

  Raises:
    ValueError: `vocab`'s title tokens were made with another
      `title_standardize` than `config`'s.
  """
  if vocab.title_standardize != config.title_standardize:
    raise ValueError(
        f"The title vocabulary was adapted with title_standardize="
        f"{vocab.title_standardize!r}, not {config.title_standardize!r}; "
        "rebuild the vocabularies.")
  return ItemPreprocessor(vocab.items, vocab.authors, vocab.categories,
                          vocab.top_categories, vocab.title_tokens,
                          vocab.means, vocab.variances, config)


def raw_item_features(items: pd.DataFrame, config: FeatureConfig) -> dict:
  """The raw feature dict of a DataFrame of books (as ingest produces)."""
  return {
      "parent_asin": items["parent_asin"].to_numpy(dtype=str),
      "title": items["title"].to_numpy(dtype=str),
      "author": items["author"].to_numpy(dtype=str),
      "categories": pad_categories(items, config.max_categories).astype(str),
      **{c: items[c].to_numpy(dtype=np.float32) for c in NUMERIC_COLUMNS},
  }


def build_item_table(items: pd.DataFrame, preprocessor: ItemPreprocessor,
                     config: FeatureConfig,
                     batch_size: int = 65536) -> dict[str, np.ndarray]:
  """Runs the preprocessor once over the corpus.

  Returns a dict of arrays with num_items + 1 rows; row 0 is the padding
  book (all zeros), row i is corpus item i. `id` is the item-id embedding
  index: the corpus index for books seen in training, else 0 (unknown).
  """
  raw = raw_item_features(items, config)
  parts = []
  for start in range(0, len(items), batch_size):
    chunk = {k: tf.constant(v[start:start + batch_size]) for k, v in raw.items()}
    parts.append({k: v.numpy() for k, v in preprocessor(chunk).items()})
  table = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  table = {k: np.concatenate([np.zeros_like(v[:1]), v]) for k, v in table.items()}
  in_train = np.r_[False, items["train_count"].to_numpy() > 0]
  table["id"] = np.where(in_train, table.pop("item"), 0).astype(np.int64)
  return table
