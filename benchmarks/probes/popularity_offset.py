"""Probe: does beta * log(training frequency) added to a trained variant's
logits raise validation recall? (docs/results.md, third session.)

    .venv/bin/python benchmarks/probes/popularity_offset.py <model_dir> [variant] [betas]

betas: comma-separated (default 0,0.25,0.5,0.75,1; negative ones favour
rarer books).
"""
import sys
import numpy as np
import tt_mimic  # noqa
import tensorflow as tf
from tt_mimic.training import pipeline, evaluation

model_dir, variant = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "dat"
config, prep = pipeline.open_run(model_dir)
built = pipeline.load_variant(model_dir, config, prep, variant)
emb = pipeline.item_embeddings(built.encoder, len(prep.data.items))
model_score = pipeline.model_scorer(built, len(prep.data.items), emb)
tau = config.loss.temperature
p = np.asarray(prep.item_probability, np.float64)
logp = tf.constant(np.log(np.maximum(p, 1e-12)), tf.float32)
betas = ([float(b) for b in sys.argv[3].split(",")] if len(sys.argv) > 3
         else [0.0, 0.25, 0.5, 0.75, 1.0])
for beta in betas:
  def score(batch, beta=beta):
    # model_scorer: a book's best score over the user's query vectors.
    return model_score(batch) / tau + beta * logp[None, :]
  m = evaluation.evaluate(score, prep.val, ks=(20, 100), batch_size=256)
  print(f"beta={beta}: recall@20={m['recall@20']:.4f} ndcg@20={m['ndcg@20']:.4f} recall@100={m['recall@100']:.4f}", flush=True)
