"""Training under tf.distribute.MirroredStrategy with two replicas.

The machine has no GPU, so the CPU is split into two logical devices in a
fresh process and `--distribute=mirrored` mirrors the model over both: the
same code path as several GPUs (per-replica batches, summed gradients).
"""

import json
import subprocess
import sys
import textwrap

import tiny_data

_SCRIPT = textwrap.dedent("""
    import sys
    import tt_mimic
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from absl import app
    from tt_mimic.commands import train
    app.run(train.main)
""")


def test_mirrored_two_replicas_trains_and_evaluates(tmp_path):
  dataset = tiny_data.write_dataset(tmp_path, "small")
  model_dir = tmp_path / "run"
  values = tiny_data.train_flags(dataset, model_dir, distribute="mirrored",
                                 variants=["popularity", "dat"], epochs=1)
  script = tmp_path / "run_mirrored.py"
  script.write_text(_SCRIPT)
  result = subprocess.run(
      [sys.executable, str(script), *tiny_data.as_argv(values)],
      capture_output=True, text=True, timeout=600,
      cwd=tiny_data.REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Using MirroredStrategy with devices" in result.stderr
  assert "CPU:1" in result.stderr
  metrics = json.loads((model_dir / "metrics.json").read_text())
  for name in ("popularity", "dat"):
    for key in ("recall@20", "ndcg@20"):
      assert 0.0 <= metrics[name][key] <= 1.0
  # The "small" dataset has a genre signal the model must pick up.
  assert metrics["dat"]["recall@20"] > 0.0
