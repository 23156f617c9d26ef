"""`<model_dir>/report.md`: metrics, curves, diagnostics, example users."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
from tensorboard.plugins import projector

from tt_mimic.training import evaluation
from tt_mimic.training import experiment
from tt_mimic.data import features
from tt_mimic.training import pipeline
from tt_mimic.training import plots


def _summary(values: np.ndarray) -> str:
  if values.size == 0:
    return "n/a"
  q = np.percentile(values, [5, 50, 95])
  return (f"mean {values.mean():.3f}, p5 {q[0]:.3f}, median {q[1]:.3f}, "
          f"p95 {q[2]:.3f}")


def neighbour_overlap(embeddings: np.ndarray, cats: np.ndarray,
                      rng: np.random.Generator, n: int = 500,
                      k: int = 10) -> tuple[float, float]:
  """Share of each item's k nearest items with its top category, vs chance."""
  ids = np.flatnonzero(cats[1:] != "") + 1
  if ids.size < k + 2:
    return float("nan"), float("nan")
  sample = rng.choice(ids, min(n, ids.size), replace=False)
  scores = embeddings[sample] @ embeddings[ids].T
  scores[np.arange(len(sample)), np.searchsorted(ids, sample)] = -np.inf
  nearest = ids[np.argsort(-scores, axis=1)[:, :k]]
  same = (cats[nearest] == cats[sample][:, None]).mean()
  _, counts = np.unique(cats[ids], return_counts=True)
  chance = ((counts / counts.sum()) ** 2).sum()
  return float(same), float(chance)


def diagnostics(prep: pipeline.Prepared, built: pipeline.Built, result: dict,
                emb: np.ndarray) -> list[str]:
  """Embedding diagnostics of one trained variant, as Markdown lines.

  `emb` is the variant's [num_items + 1, dim] corpus embedding table
  (`pipeline.item_embeddings`).
  """
  rng = np.random.default_rng(0)
  n_items = len(prep.data.items)
  cats = prep.item_categories
  same, chance = neighbour_overlap(emb, cats, rng)
  lines = [f"- Item embeddings p_v: {n_items} books, L2 norms "
           f"{_summary(np.linalg.norm(emb[1:], axis=1))}.",
           f"- Neighbour category overlap: {same:.3f} of each book's 10 "
           f"nearest books share its top-level category (chance {chance:.3f})."]
  val = prep.val
  rows = rng.choice(len(val), min(2000, len(val)), replace=False)
  batch = {"user_id": tf.constant(val.user_id[rows]),
           "history": tf.constant(val.history[rows])}
  p_u, a_u = built.user_tower(batch)
  # [users, interests, dim]: one interest for a single-vector tower.
  p_u = p_u.numpy().reshape(len(rows), -1, emb.shape[1])
  hist = emb[val.history[rows]]
  valid = (val.history[rows] != 0)[..., None]
  profile = (hist * valid).sum(1) / np.maximum(valid.sum(1), 1)
  align = (p_u * profile[:, None]).sum(-1).max(-1)
  shuffled = (p_u * profile[rng.permutation(len(rows))][:, None]).sum(
      -1).max(-1)
  lines.append(f"- User-feature alignment: <p_u, mean p_v of history> "
               f"{_summary(align)} (shuffled users: {shuffled.mean():.3f}).")
  if a_u is not None:
    a_v = built.item_tower.augmented.embeddings.numpy()
    lines.append(f"- a_u norms {_summary(np.linalg.norm(a_u.numpy(), axis=1))}"
                 f"; a_v norms {_summary(np.linalg.norm(a_v[1:], axis=1))}.")
    hist_rows = result.get("history", [])
    if hist_rows:
      first, best = hist_rows[0], hist_rows[max(result["best_epoch"] - 1, 0)]
      lines.append(
          f"- Mimic distance (mean ||a - sg(p)||^2 per epoch): loss_u "
          f"{first.get('loss_u', float('nan')):.3f} -> "
          f"{best.get('loss_u', float('nan')):.3f}, loss_v "
          f"{first.get('loss_v', float('nan')):.3f} -> "
          f"{best.get('loss_v', float('nan')):.3f} (epoch 1 -> best epoch "
          f"{result['best_epoch']}).")
  return lines


def feature_correlations(prep: pipeline.Prepared) -> list[str]:
  """Pearson correlations of the numeric book features and popularity."""
  items = prep.data.items
  frame = {"average_rating": items["average_rating"],
           "log1p(rating_number)": np.log1p(items["rating_number"]),
           "log1p(price)": np.log1p(items["price"]),
           "log1p(train_count)": np.log1p(items["train_count"])}
  corr = pd.DataFrame(frame).corr(min_periods=10)
  names = list(frame)
  lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for a in names:
    lines.append(f"| {a} | " + " | ".join(
        "n/a" if np.isnan(corr.loc[a, b]) else f"{corr.loc[a, b]:.3f}"
        for b in names) + " |")
  missing = ", ".join(f"{c} {items[c].isna().mean():.1%}"
                      for c in ("average_rating", "rating_number", "price"))
  return lines + ["", f"Missing values: {missing} (n/a: too few values)."]


def curves(results: dict) -> list[str]:
  lines = []
  for name, result in results.items():
    if not result.get("history"):
      continue  # a refit: fixed epochs, no validation
    lines += [f"### {name}", "", "| epoch | loss_main | loss_u | loss_v | "
              "loss_ca | val recall@20 | val ndcg@20 |", "|---|---|---|---|---|---|---|"]
    for h in result.get("history", []):
      lines.append(
          f"| {h['epoch']} | {h.get('loss_main', float('nan')):.4f} | "
          f"{h.get('loss_u', 0):.4f} | {h.get('loss_v', 0):.4f} | "
          f"{h.get('loss_ca', 0):.4f} | {h.get('val_recall@20', 0):.4f} | "
          f"{h.get('val_ndcg@20', 0):.4f} |")
    lines.append("")
  return lines


def examples(prep: pipeline.Prepared, built: pipeline.Built, emb: np.ndarray,
             n_users: int = 3, k: int = 10) -> list[str]:
  """Sample test users: history, top-k and category/author match rates."""
  items = prep.data.items
  cats = prep.item_categories
  authors = np.r_[[""], items["author"].to_numpy(dtype=object)]
  titles = np.r_[[""], items["title"].to_numpy(dtype=object)]
  test = prep.test
  rows = np.random.default_rng(1).choice(len(test), min(n_users, len(test)),
                                         replace=False)
  scorer = pipeline.model_scorer(built, len(items), emb)
  lines = []
  for row in rows:
    batch = {"user_id": tf.constant(test.user_id[row:row + 1]),
             "history": tf.constant(test.history[row:row + 1])}
    scores = evaluation.mask_seen(scorer(batch), [test.seen[row]])
    top = tf.math.top_k(scores, k).indices.numpy()[0]
    hist = test.seen[row]
    cat_rate = np.isin(cats[top], cats[hist][cats[hist] != ""]).mean()
    author_rate = np.isin(authors[top], authors[hist][authors[hist] != ""]).mean()
    user = prep.data.users[test.users[row] - 1]
    lines += [f"### user {user}", "",
              f"History ({len(hist)} training books, most recent last): " +
              "; ".join(f"{titles[i]} ({authors[i] or '?'}, {cats[i] or '?'})"
                        for i in hist[-5:]), "",
              f"Category match {cat_rate:.0%}, author match {author_rate:.0%}; "
              "held-out book: " + "; ".join(titles[i] for i in test.targets[row]),
              "", "| rank | title | author | category | hit |", "|---|---|---|---|---|"]
    for rank, i in enumerate(top, 1):
      hit = "yes" if i in test.targets[row] else ""
      lines.append(f"| {rank} | {titles[i]} | {authors[i]} | {cats[i]} | {hit} |")
    lines.append("")
  return lines


def write_projector(log_dir: str, prep: pipeline.Prepared, emb: np.ndarray,
                    max_items: int = 10000) -> None:
  """Item embeddings (the most popular `max_items`) for TensorBoard's projector."""
  os.makedirs(log_dir, exist_ok=True)
  items = prep.data.items
  emb = emb[1:]
  keep = np.argsort(-items["train_count"].to_numpy(), kind="stable")[:max_items]
  clean = lambda v: " ".join(str(v).split()) or "?"  # noqa: E731
  with open(os.path.join(log_dir, "metadata.tsv"), "w") as f:
    f.write("parent_asin\ttitle\tauthor\tcategory\n")
    for i in keep:
      row = items.iloc[i]
      f.write("\t".join(clean(v) for v in (
          row["parent_asin"], row["title"], row["author"],
          features.top_category(list(row["categories"])))) + "\n")
  checkpoint = tf.train.Checkpoint(embedding=tf.Variable(emb[keep]))
  checkpoint.save(os.path.join(log_dir, "embedding.ckpt"))
  config = projector.ProjectorConfig()
  embedding = config.embeddings.add()
  embedding.tensor_name = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
  embedding.metadata_path = "metadata.tsv"
  projector.visualize_embeddings(log_dir, config)
  # TensorBoard takes a directory for a run only when it holds an event
  # file; without one the Projector tab said "No checkpoint was found"
  # unless TensorBoard was pointed at this directory alone.
  writer = tf.summary.create_file_writer(log_dir)
  with writer.as_default():
    tf.summary.scalar("projector/books", len(keep), step=0)
  writer.close()


SEGMENT_TITLES = {"user_activity": "users by known events",
                  "item_popularity": "held-out books by popularity tier",
                  "cold_books": "held-out books: cold (<= 2 fitted events) "
                                "or warm",
                  "category": "held-out books by top-level category"}


def segments(metrics: dict | list[dict], k: int = 20) -> list[str]:
  """Recall@k of every variant by segment, one table per kind.

  `metrics`: one run's test metrics by variant (metrics.json's layout), or
  a list of them, one per seed: then each cell is the mean ± standard
  deviation over the seeds that have the variant and segment (and how
  many those are, when not all).
  """
  runs = metrics if isinstance(metrics, list) else [metrics]
  names = list(dict.fromkeys(n for run in runs for n, m in run.items()
                             if isinstance(m, dict) and "segments" in m))
  if not names:
    return []

  def kind_of(run, name, kind):
    """{segment: metrics} of one kind for a variant of one run ({} if none)."""
    return run.get(name, {}).get("segments", {}).get(kind, {})

  def found(kind, seg, name):
    return [kind_of(run, name, kind)[seg] for run in runs
            if seg in kind_of(run, name, kind)]

  def cell(values):
    if not values:
      return "-"
    recall = np.array([v[f"recall@{k}"] for v in values])
    if len(runs) == 1:
      return f"{recall[0]:.4f}"
    text = f"{recall.mean():.4f} ± {recall.std():.4f}"
    if len(values) < len(runs):
      text += f" ({len(values)} of {len(runs)} seeds)"
    return text

  lines = []
  for kind, title in SEGMENT_TITLES.items():
    rows = list(dict.fromkeys(
        seg for run in runs for n in names for seg in kind_of(run, n, kind)))
    lines += [f"### Recall@{k}, {title}", "",
              "| segment | n | " + " | ".join(names) + " |",
              "|---|---|" + "---|" * len(names)]
    for seg in rows:
      first = next(v for n in names for v in found(kind, seg, n))
      size = first.get("users", first.get("targets"))
      cells = [cell(found(kind, seg, n)) for n in names]
      lines.append(f"| {seg} | {size} | " + " | ".join(cells) + " |")
    lines.append("")
  return lines


def plot_links(model_dir: str, metrics: dict, results: dict) -> dict:
  """Writes <model_dir>/plots/*.png (`plots.write`).

  Returns:
    {plot name: Markdown lines showing it}, with paths relative to
    model_dir (where report.md is).
  """
  written = plots.write(os.path.join(model_dir, "plots"), metrics, results)
  return {name: [f"![{caption}]({os.path.relpath(path, model_dir)})", ""]
          for name, (caption, path) in written.items()}


def write(model_dir: str, prep: pipeline.Prepared, metrics: dict,
          results: dict, built: dict) -> str:
  """Writes report.md and returns its path."""
  cols = [f"{m}@{k}" for k in evaluation.KS for m in ("recall", "ndcg", "hr")]
  lines = ["# tt_mimic run report", "",
           f"Split: {prep.data.report['config']['split']}; corpus "
           f"{len(prep.data.items)} books, {len(prep.data.users)} users; "
           f"test users {len(prep.test)} (skipped without training history: "
           f"{prep.test.skipped_no_history}). Full-corpus ranking; each user's "
           "known books (training and validation) are masked.", "",
           "## Test metrics", "",
           experiment.table(metrics), ""]
  pictures = plot_links(model_dir, metrics, results)
  lines += pictures.get("test_metrics", [])
  lines += ["### All cut-offs", "",
           experiment.table(metrics, cols + ["mrr"]), "",
           "## Where each variant hits (test segments)", ""]
  lines += segments(metrics)
  lines += ["## Loss curves", "",
           f"TensorBoard: `tensorboard --logdir {model_dir}/tensorboard` "
           "(every loss term, learning rate, validation metrics, and the "
           "item embedding projector).", ""]
  lines += pictures.get("loss", []) + pictures.get("validation", [])
  lines += curves(results)
  lines += ["## Feature correlations (corpus books)", ""]
  lines += feature_correlations(prep) + [""]
  n_items = len(prep.data.items)
  embeddings = {name: pipeline.item_embeddings(built[name].encoder, n_items)
                for name in ("dat", "dat_no_cal", "two_tower") if name in built}
  for name, emb in embeddings.items():
    lines += [f"## Embedding diagnostics ({name})", ""]
    lines += diagnostics(prep, built[name], results[name], emb) + [""]
  if "dat" in built:
    write_projector(os.path.join(model_dir, "tensorboard", "projector"), prep,
                    embeddings["dat"])
    lines += ["## Example recommendations (dat)", ""]
    lines += examples(prep, built["dat"], embeddings["dat"])
  path = os.path.join(model_dir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path
