"""How book titles are standardized before TextVectorization splits them.

Two choices (`FeatureConfig.title_standardize`):

  ascii    Keras' "lower_and_strip_punctuation": lower-cases A-Z only and
           removes ASCII punctuation, so "Éléments" and "ÉLÉMENTS" are
           different tokens.
  unicode  `unicode_standardize`: tensorflow-text's Unicode case folding
           with NFKC normalization, then Unicode punctuation and symbols
           removed.

Both are TensorFlow ops, so the adapted vocabulary, the item table and the
exported candidate SavedModel tokenize alike. A SavedModel standardized with
"unicode" holds tensorflow-text ops: a process must call `load_ops()` before
`tf.saved_model.load` of it.
"""

from __future__ import annotations

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

ASCII = "ascii"
UNICODE = "unicode"
STANDARDIZE = (ASCII, UNICODE)

# Apostrophes (' ’ ‘ ` ´) are dropped so that "Sorcerer’s" and "Sorcerer's"
# are one token, "sorcerers", as under "ascii".
_APOSTROPHES = r"[\x{27}\x{2018}\x{2019}\x{60}\x{b4}]"
# Every other run of punctuation (\p{P}: dashes, « », ¿, 。...) or symbol
# (\p{S}: + $ © ®, emoji...) becomes a space: "Guerre—Paix" -> "guerre paix".
_PUNCTUATION = r"[\p{P}\p{S}]+"


def load_ops():
  """Imports tensorflow-text, which registers its ops; returns the module."""
  import tensorflow_text  # pylint: disable=g-import-not-at-top
  return tensorflow_text


def unicode_standardize(titles: tf.Tensor) -> tf.Tensor:
  """Case-folded, NFKC-normalized titles without punctuation.

  `case_fold_utf8` is ICU's NFKC_Casefold: it folds the case of every
  script (Cyrillic, Greek, full-width Latin, "ß" -> "ss") and applies NFKC,
  so "É" and its decomposed form (E, U+0301) both become "é", full-width
  "Ａ" becomes "a", the ligature "ﬁ" "fi" and "™" "tm"; a separate
  `normalize_utf8(NFKC)` would change nothing. Accents are kept (no NFKD +
  \\p{Mn} removal): they tell words apart in titles ("año" / "ano",
  "schön" / "schon"), and \\p{Mn} also holds marks that spell words in
  other scripts: Devanagari "ु", Thai "ิ", the Japanese dakuten ("が" -> "か").

  Example: "¿Qué?—«ÉLÉMENTS»" -> " qué éléments ".

  Args:
    titles: string tensor of any shape.

  Returns:
    A string tensor of the same shape; TextVectorization's whitespace split
    drops the extra spaces.
  """
  folded = load_ops().case_fold_utf8(titles)
  folded = tf.strings.regex_replace(folded, _APOSTROPHES, "")
  return tf.strings.regex_replace(folded, _PUNCTUATION, " ")


def standardizer(name: str):
  """TextVectorization's `standardize` argument for a `title_standardize`."""
  if name == ASCII:
    return "lower_and_strip_punctuation"
  if name == UNICODE:
    return unicode_standardize
  raise ValueError(f"title_standardize {name!r} is not one of {STANDARDIZE}.")
