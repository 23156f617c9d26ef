"""Tests for tt_mimic.data.text: the two title standardizations, through
TextVectorization as the item preprocessor uses them."""

from absl.testing import parameterized

import tt_mimic  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf

from tt_mimic.data import text

# "Éléments" four ways: precomposed, lower-case, decomposed (E + U+0301
# COMBINING ACUTE ACCENT), upper-case.
ELEMENTS = ("Éléments", "éléments", "E\u0301le\u0301ments", "ÉLÉMENTS")


def vocabulary(name, titles):
  """The tokens TextVectorization adapts from `titles` under `name`."""
  layer = tf.keras.layers.TextVectorization(
      standardize=text.standardizer(name))
  layer.adapt(tf.constant(titles))
  return sorted(layer.get_vocabulary()[2:])  # without "" and [UNK]


class StandardizeTest(tf.test.TestCase, parameterized.TestCase):

  def test_unicode_folds_case_and_composition_to_one_token(self):
    self.assertEqual(vocabulary(text.UNICODE, ELEMENTS), ["éléments"])

  def test_ascii_keeps_them_apart(self):
    # tf.strings.lower lower-cases A-Z only, so "É" stays upper-case
    # ("ÉLÉMENTS" -> "ÉlÉments") and the decomposed form keeps its own bytes:
    # four tokens.
    self.assertEqual(vocabulary(text.ASCII, ELEMENTS), sorted(
        ["Éléments", "éléments", "e\u0301le\u0301ments", "ÉlÉments"]))

  @parameterized.parameters(
      ("ВОЙНА и МИР", "война и мир"),  # Cyrillic case
      ("東京物語", "東京物語"),  # CJK kept
      ("ＴＯＫＹＯ　ＳＴＯＲＩＥＳ", "tokyo stories"),  # full-width, U+3000
      ("Straße", "strasse"),  # full case folding
      ("ﬁre", "fire"),  # NFKC: the ligature
      ("Año", "año"),  # accents kept: not "ano"
  )
  def test_unicode_case_and_scripts(self, title, expected):
    self.assertEqual(vocabulary(text.UNICODE, [title]),
                     sorted(expected.split()))

  @parameterized.parameters(
      ("¿Qué?—«Hola»", ["hola", "qué"]),
      ("Guerre—Paix", ["guerre", "paix"]),  # a dash separates
      ("L’Étranger…", ["létranger"]),  # an apostrophe joins
      ("Harry Potter & the Sorcerer's Stone: 20th ed.",
       ["20th", "ed", "harry", "potter", "sorcerers", "stone", "the"]),
      ("«Мастер и Маргарита»", ["и", "маргарита", "мастер"]),
      ("君の名は。", ["君の名は"]),
      ("Love ♥ © 2020 ®", ["2020", "love"]),
  )
  def test_unicode_strips_punctuation_and_symbols(self, title, expected):
    self.assertEqual(vocabulary(text.UNICODE, [title]), sorted(expected))

  def test_ascii_keeps_unicode_punctuation(self):
    # The behaviour the unicode choice fixes: "¿", "—", "«", "»" stay glued.
    self.assertEqual(vocabulary(text.ASCII, ["¿Qué?—«Hola»"]),
                     ["¿qué—«hola»"])

  def test_unicode_standardize_keeps_the_shape(self):
    out = text.unicode_standardize(tf.constant([["A!"], ["Б"]]))
    self.assertAllEqual(out, [[b"a "], ["б".encode()]])

  def test_unknown_choice(self):
    with self.assertRaisesRegex(ValueError, "not one of"):
      text.standardizer("latin")


if __name__ == "__main__":
  tf.test.main()
