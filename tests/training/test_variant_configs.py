"""Tests for tt_mimic.training.pipeline.variant_configs: each named variant's
tower and loss settings."""

from absl.testing import parameterized

import tt_mimic  # noqa: F401  (must precede TensorFlow)

from tt_mimic.config import LossConfig
from tt_mimic.config import TowerConfig
from tt_mimic.training import pipeline


class VariantConfigsTest(parameterized.TestCase):

  @parameterized.parameters(
      ("id_only", False, False, False),
      ("two_tower", False, False, False),
      ("dat_no_cal", True, True, False),
      ("dat", True, True, True))
  def test_amm_and_cal_follow_the_variant(self, name, amm, mimic_only, cal):
    tower, loss = pipeline.variant_configs(
        name, TowerConfig(amm_mimic_only=True), LossConfig())
    self.assertEqual(tower.use_amm, amm)
    # Without AMM the flag has nothing to act on, so it is stamped off.
    self.assertEqual(tower.amm_mimic_only, mimic_only)
    self.assertEqual(loss.use_cal, cal)
    self.assertEqual(tower.id_only, name == "id_only")

  def test_switched_off_parts_stay_off(self):
    tower, loss = pipeline.variant_configs(
        "dat", TowerConfig(use_amm=False, amm_mimic_only=True),
        LossConfig(use_cal=False))
    self.assertFalse(tower.use_amm)
    self.assertFalse(tower.amm_mimic_only)
    self.assertFalse(loss.use_cal)

  @parameterized.parameters(
      ("two_tower", 0.5, 0.5, 1.0),
      ("dat_no_cal", 0.2, 0.3, 1.0),
      ("dat", 0.2, 0.3, 4.0))
  def test_weights_of_missing_parts_are_stamped_at_their_defaults(
      self, name, lambda_u, lambda_v, lambda_ca):
    """Their loss terms are zero, so the weights change nothing: a variant
    without a part keeps one stamp (and its training) whatever they are."""
    _, loss = pipeline.variant_configs(
        name, TowerConfig(), LossConfig(lambda_u=0.2, lambda_v=0.3,
                                        lambda_ca=4.0))
    self.assertEqual((loss.lambda_u, loss.lambda_v, loss.lambda_ca),
                     (lambda_u, lambda_v, lambda_ca))
