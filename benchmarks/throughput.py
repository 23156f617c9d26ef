"""Training throughput: a plain TFRS ID-only two-tower against our variants.

  .venv/bin/python benchmarks/throughput.py --flagfile=flags/sample.cfg \
      --model_dir=/tmp/throughput [--batch_size=1024] [--steps=60] \
      [--optimizers=adam,catchup_adam] \
      [--profile_dir=/tmp/throughput_profile] [--json=/tmp/throughput.json]

In one process and on the same batches (taken once from the run's training
pipeline), trains for `--steps` steps each:

  plain      tfrs.Model with a user-id and an item-id embedding
             (--output_dim wide), in-batch softmax (tfrs.tasks.Retrieval),
             the same optimizer and batch size
  two_tower  our towers without AMM and CAL
  dat        AMM and CAL (the exported model)

and prints examples per second after `--warmup` steps, and each variant's
ratio to `plain`. With --optimizers, each model is timed under each.
Each model runs `--rounds` times, interleaved, and the best round counts
(the machine is shared; the best round is the least disturbed). With
--profile_dir, a TensorFlow profiler trace of `dat` is taken and its op
time is summed by op type and by layer.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tt_mimic  # noqa: F401,E402
import tensorflow as tf  # noqa: E402
import tensorflow_recommenders as tfrs  # noqa: E402
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402

from tt_mimic.commands import common  # noqa: E402  (defines the run flags)
from tt_mimic.data import ingest  # noqa: E402
from tt_mimic.data import pipeline as data_lib  # noqa: E402
from tt_mimic.training import pipeline  # noqa: E402
from tt_mimic.training import trainer  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 60, "Timed steps per model and round.")
_WARMUP = flags.DEFINE_integer("warmup", 15, "Untimed steps first.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Interleaved rounds per model.")
_MODELS = flags.DEFINE_list("models", ["plain", "two_tower", "dat"],
                            "Models to time.")
_OPTIMIZERS = flags.DEFINE_list(
    "optimizers", [], "Time each model under each of these --optimizer "
    "values (a model's name then gets ':optimizer'); default: the run's.")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", None,
                                   "Write and summarize a profile of dat.")
_JSON = flags.DEFINE_string("json", None, "Write the figures here.")


class PlainModel(tfrs.Model):
  """The plainest TFRS retrieval model: two id embeddings, in-batch softmax."""

  def __init__(self, num_users: int, num_items: int, dim: int):
    super().__init__()
    self.users = tf.keras.layers.Embedding(num_users + 1, dim)
    self.items = tf.keras.layers.Embedding(num_items + 1, dim)
    self.task = tfrs.tasks.Retrieval()

  def compute_loss(self, inputs, training=False):
    return self.task(self.users(inputs["user_id"]), self.items(inputs["item"]),
                     compute_metrics=False)


def _batches(prep, config, steps: int) -> tf.data.Dataset:
  """`steps` fixed training batches, the same for every model."""
  ds = data_lib.train_dataset(prep.sequence, prep.user_id_index,
                              prep.feature_config.history_length,
                              config.train.batch_size, config.train.seed,
                              config.train.train_history)
  batches = [b for b in ds.take(steps + 1)]
  full = [b for b in batches if int(b["item"].shape[0])
          == config.train.batch_size][:steps]
  stacked = {k: tf.stack([b[k] for b in full]) for k in full[0]}
  return tf.data.Dataset.from_tensor_slices(stacked).cache()


class _Clock(tf.keras.callbacks.Callback):

  def __init__(self, warmup: int):
    super().__init__()
    self.warmup, self.times = warmup, []

  def on_train_batch_end(self, batch, logs=None):
    self.times.append(time.perf_counter())


def _model(name, prep, config, optimizer=None):
  if optimizer:
    config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, optimizer=optimizer))
  if name == "plain":
    model = PlainModel(len(prep.data.users), len(prep.data.items),
                       config.tower.output_dim)
  else:
    tower, loss = pipeline.variant_configs(name, config.tower, config.loss)
    model = pipeline.build(prep, tower, loss).model
  model.compile(optimizer=trainer.make_optimizer(config.train))
  return model


def _time(model, data, warmup: int, steps: int, batch_size: int) -> float:
  """Examples per second over the steps after `warmup`."""
  clock = _Clock(warmup)
  model.fit(data.repeat(), steps_per_epoch=warmup + steps, epochs=1,
            verbose=0, callbacks=[clock])
  seconds = clock.times[-1] - clock.times[warmup - 1]
  return steps * batch_size / seconds


def summarize_profile(directory: str, top: int = 15) -> dict:
  """Op time of a profiler trace, summed by op type and by layer.

  Reads the XSpace protos the profiler wrote: on the host plane's executor
  threads every executed TensorFlow op is an event named
  `scope/.../name:OpType` (C++ regions are named `Class::Method`).
  """
  by_type, by_scope = collections.Counter(), collections.Counter()
  for path in glob.glob(os.path.join(directory, "**", "*.xplane.pb"),
                        recursive=True):
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
      space.ParseFromString(f.read())
    for plane in space.planes:
      names = {i: m.name for i, m in plane.event_metadata.items()}
      for line in plane.lines:
        for event in line.events:
          name = names.get(event.metadata_id, "")
          if ":" not in name or "::" in name or "__inference" in name:
            continue  # C++ regions and whole tf.functions, not TF ops
          scope, op_type = name.rsplit(":", 1)
          seconds = event.duration_ps / 1e12
          by_type[op_type] += seconds
          parts = scope.split("/")
          by_scope["/".join(parts[:2]) if len(parts) > 1 else scope] += seconds
  total = sum(by_type.values()) or 1.0
  return {"total_op_seconds": total,
          "by_op_type": [(k, v / total) for k, v in by_type.most_common(top)],
          "by_scope": [(k, v / total) for k, v in by_scope.most_common(top)]}


def main(argv):
  del argv
  config = common.run_config()
  data = ingest.run_cached(config.ingest, common.MODEL_DIR.value,
                           common.CACHE_DIR.value)
  prep = pipeline.prepare(data, config.features, config.train)
  batch = config.train.batch_size
  data_ds = _batches(prep, config, _WARMUP.value + _STEPS.value)
  print(f"{len(prep.sequence)} training events, {len(data.items)} books, "
        f"{len(data.users)} users; batch {batch}, {_STEPS.value} timed steps "
        f"after {_WARMUP.value}, {os.cpu_count()} CPUs")
  rates = collections.defaultdict(list)
  runs = [(name, optimizer, f"{name}:{optimizer}" if optimizer else name)
          for name in _MODELS.value
          for optimizer in _OPTIMIZERS.value or [None]]
  for round_ in range(_ROUNDS.value):
    for name, optimizer, key in runs:
      tf.keras.utils.set_random_seed(config.train.seed)
      model = _model(name, prep, config, optimizer)
      rate = _time(model, data_ds, _WARMUP.value, _STEPS.value, batch)
      rates[key].append(rate)
      print(f"  round {round_ + 1} {key:<22} {rate:9.0f} examples/s",
            flush=True)
  best = {key: max(values) for key, values in rates.items()}
  # The baseline: plain (under the first optimizer listed).
  base = next((best[key] for name, _, key in runs if name == "plain"), None)
  print("\nexamples/s (best round) and ratio to plain:")
  for key, rate in best.items():
    ratio = f"{rate / base:.2f}x" if base else "-"
    print(f"  {key:<22} {rate:9.0f}  {ratio}")
  result = {"examples_per_second": best, "rounds": dict(rates),
            "ratio_to_plain": {n: r / base for n, r in best.items()}
            if base else {}, "batch_size": batch,
            "train_events": len(prep.sequence),
            "epoch_minutes": {n: len(prep.sequence) / r / 60
                              for n, r in best.items()}}
  if _PROFILE_DIR.value:
    tf.keras.utils.set_random_seed(config.train.seed)
    model = _model("dat", prep, config)
    model.fit(data_ds.repeat(), steps_per_epoch=_WARMUP.value, epochs=1,
              verbose=0)
    tf.profiler.experimental.start(_PROFILE_DIR.value)
    model.fit(data_ds.repeat(), steps_per_epoch=min(20, _STEPS.value),
              epochs=1, verbose=0)
    tf.profiler.experimental.stop()
    summary = summarize_profile(_PROFILE_DIR.value)
    result["profile"] = summary
    print(f"\nprofile of dat ({summary['total_op_seconds']:.2f} s of op "
          "time): share by op type")
    for name, share in summary["by_op_type"]:
      print(f"  {share:6.1%}  {name}")
    print("share by layer")
    for name, share in summary["by_scope"]:
      print(f"  {share:6.1%}  {name}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=1, default=float)
  return result


if __name__ == "__main__":
  app.run(main)
