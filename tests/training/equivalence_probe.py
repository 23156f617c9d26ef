"""Loss terms and gradients of one global batch, on one replica and under a
tf.distribute strategy, written to an .npz file for the test to compare.

Run as a script in a fresh process (the caller sets up devices or
TF_CONFIG):

  python equivalence_probe.py <mirrored|multi_worker> <out.npz> <data_dir>

For `mirrored` the process splits its CPU into two logical devices. For
`multi_worker` each worker process holds one replica (TF_CONFIG names the
cluster) and writes its own file. Both the distributed values and the
single-replica reference (the same weights, the whole batch, no strategy)
are computed in the same process.
"""

import dataclasses
import os
import sys

# A global batch that two replicas split unevenly (17 + 16).
GLOBAL_BATCH = 33
TERMS = ("loss_main", "loss_u", "loss_v", "loss_ca")


def main(kind: str, out: str, data_dir: str) -> None:
  import tt_mimic  # noqa: F401  pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if kind == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  import tiny_data  # pylint: disable=g-import-not-at-top
  import tiny_model  # pylint: disable=g-import-not-at-top
  from tt_mimic.config import LossConfig  # pylint: disable=g-import-not-at-top
  from tt_mimic.training import pipeline  # pylint: disable=g-import-not-at-top
  from tt_mimic.training import trainer  # pylint: disable=g-import-not-at-top

  strategy = trainer.strategy(kind)
  replicas = strategy.num_replicas_in_sync
  prep = tiny_data.prepared(data_dir)
  # No training-time dropout: the replicas' random draws are equal to one
  # replica's in distribution only.
  tower = dataclasses.replace(tiny_model.TOWER, user_id_dropout=0.0,
                              history_dropout=0.0)
  loss = LossConfig(lambda_ca=1.0)
  batch = tiny_model.train_batch(prep, GLOBAL_BATCH)
  assert int(batch["item"].shape[0]) == GLOBAL_BATCH

  tf.keras.utils.set_random_seed(0)
  single = pipeline.build(prep, tower, loss)
  pipeline.create_variables(single, prep)
  with strategy.scope():
    multi = pipeline.build(prep, tower, loss)
    pipeline.create_variables(multi, prep)
  multi.model.set_weights(single.model.get_weights())

  def gradients(model, inputs):
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
      terms = model.loss_terms(inputs, training=True)
    out = {}
    for name in TERMS:
      grads = tape.gradient(terms[name], variables,
                            unconnected_gradients="zero")
      out[name] = (terms[name], [tf.convert_to_tensor(g) for g in grads])
    return out

  results = {}
  reference = gradients(single.model, batch)
  # Replica r of R gets rows [bounds[r], bounds[r + 1]) of the global batch
  # (the split tf.data uses: the first replicas one row larger).
  sizes = [GLOBAL_BATCH // replicas + (r < GLOBAL_BATCH % replicas)
           for r in range(replicas)]
  bounds = np.cumsum([0] + sizes)

  def local_batch(context):
    r = context.replica_id_in_sync_group
    return {k: v[bounds[r]:bounds[r + 1]] for k, v in batch.items()}

  distributed = strategy.experimental_distribute_values_from_function(
      local_batch)
  per_replica = strategy.run(tf.function(
      lambda b: gradients(multi.model, b)), args=(distributed,))
  summed = tf.nest.map_structure(
      lambda v: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None),
      per_replica)
  for name in TERMS:
    results[f"single/{name}"] = reference[name][0].numpy()
    results[f"multi/{name}"] = summed[name][0].numpy()
    for i, (a, b) in enumerate(zip(reference[name][1], summed[name][1])):
      results[f"single/{name}/grad{i}"] = a.numpy()
      results[f"multi/{name}/grad{i}"] = b.numpy()

  # One optimizer step through Keras' own train step (fit), which splits
  # the batch, sums the replicas' gradients and updates the variables.
  for model, scope in ((single.model, None), (multi.model, strategy)):
    if scope is None:
      model.compile(optimizer=tf.keras.optimizers.SGD(0.5))
    else:
      with scope.scope():
        model.compile(optimizer=tf.keras.optimizers.SGD(0.5))
    data = tf.data.Dataset.from_tensor_slices(batch).batch(GLOBAL_BATCH)
    model.fit(data, epochs=1, verbose=0)
  for i, (a, b) in enumerate(zip(single.model.trainable_variables,
                                 multi.model.trainable_variables)):
    results[f"single/step/var{i}"] = a.numpy()
    results[f"multi/step/var{i}"] = b.numpy()
  results["replicas"] = np.array(replicas)
  np.savez(out, **results)


if __name__ == "__main__":
  main(*sys.argv[1:4])
