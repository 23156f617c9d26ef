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
