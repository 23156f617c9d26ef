"""Training under tf.distribute.MirroredStrategy with two replicas.

The machine has no GPU, so the CPU is split into two logical devices in a
fresh process and `--distribute=mirrored` mirrors the model over both: the
same code path as several GPUs (per-replica batches, summed gradients).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

import tiny_data

PROBE = os.path.join(os.path.dirname(__file__), "equivalence_probe.py")

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


def _compare(path, replicas):
  """Every loss term, its gradients and one training step: R replicas equal
  one replica on the same global batch."""
  with np.load(path) as f:
    values = dict(f)
  assert int(values["replicas"]) == replicas
  names = sorted(k[len("single/"):] for k in values if k.startswith("single/"))
  assert any(n.startswith("loss_ca/grad") for n in names)
  assert any(n.startswith("step/var") for n in names)
  for name in names:
    single, multi = values[f"single/{name}"], values[f"multi/{name}"]
    np.testing.assert_allclose(multi, single, rtol=1e-4, atol=2e-6,
                               err_msg=name)
  # The terms are not trivially zero: every one is trained.
  for term in ("loss_main", "loss_u", "loss_v", "loss_ca"):
    assert values[f"single/{term}"] > 0, term
    assert max(np.abs(values[k]).max() for k in values
               if k.startswith(f"single/{term}/grad")) > 0, term


def test_mirrored_two_replicas_equal_one_replica(tmp_path):
  out = tmp_path / "mirrored.npz"
  result = subprocess.run(
      [sys.executable, PROBE, "mirrored", str(out), str(tmp_path)],
      capture_output=True, text=True, timeout=600, cwd=tiny_data.REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  _compare(out, replicas=2)
