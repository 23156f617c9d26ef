"""tt_mimic: two-tower book retrieval with DAT's Adaptive-Mimic Mechanism.

TensorFlow Recommenders 0.7.7 needs Keras 2 (the `tf-keras` package). The
variable below must be set before TensorFlow is first imported anywhere in
the process, so the package sets it on import and every module imports the
package first.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
