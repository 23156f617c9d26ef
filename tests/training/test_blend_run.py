"""--ease_weights: the exported towers blended with EASE, chosen on
validation, evaluated, exported and served as one model."""

import dataclasses
import json
import os
import shutil

from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tt_mimic.commands import evaluate as evaluate_command
from tt_mimic.commands import train
from tt_mimic.config import ExportConfig
from tt_mimic.model import ease as ease_lib
from tt_mimic.serving import catalog
from tt_mimic.serving import export
from tt_mimic.serving import recommender
from tt_mimic.training import blend as blend_lib
from tt_mimic.training import evaluation
from tt_mimic.training import pipeline

import tiny_data

FLAGS = flags.FLAGS
WEIGHTS = (0.3, 0.9)
# No power 0: a chosen blend is always one whose EASE scores are divided.
POWERS = (0.5, 1.0)


@pytest.fixture(scope="module")
def blend_run(tmp_path_factory):
  """dat and its refit, blended with EASE (two lambdas, two weights, two
  popularity powers)."""
  if not FLAGS.is_parsed():
    FLAGS.mark_as_parsed()
  root = tmp_path_factory.mktemp("blend")
  dataset = tiny_data.write_dataset(root, "small")
  model_dir = str(root / "run")
  values = tiny_data.train_flags(
      dataset, model_dir, epochs=2, patience=0, variants=["popularity", "dat"],
      refit=True, interests=2, ease_weights=[str(w) for w in WEIGHTS],
      ease_lambdas=["5", "50"], ease_top_k=30,
      ease_popularity_powers=[str(p) for p in POWERS])
  with flagsaver.flagsaver(**values):
    train.main(["train"])
  return model_dir


def _json(*parts):
  with open(os.path.join(*parts)) as f:
    return json.load(f)


def test_the_weight_is_the_best_on_validation(blend_run):
  metrics = _json(blend_run, "metrics.json")
  name = "dat_refit" + pipeline.BLEND_SUFFIX
  assert pipeline.has_blend(blend_run, name) == (name in metrics)
  info = _json(blend_run, "variants", name, pipeline.BLEND_INFO)
  if name not in metrics:
    # Validation preferred the towers alone: nothing blended is exported.
    assert info["w"] == 0.0
    assert pipeline.exported_variant(blend_run) == "dat_refit"
    pytest.skip("validation chose the towers alone on this data")
  grid = {(g["w"], g["popularity_power"]): g["recall@20"]
          for g in info["weights"]}
  # w = 0, the towers alone, is one point whatever the power.
  assert sorted(grid) == sorted([(0.0, 0.0)] + [(w, p) for w in WEIGHTS
                                                for p in POWERS])
  chosen = (info["w"], info["popularity_power"])
  assert info["w"] > 0 and grid[chosen] == max(grid.values())
  assert info["val_recall@20"] == grid[chosen]
  lambdas = {g["lambda"]: g["recall@20"] for g in info["lambdas"]}
  assert sorted(lambdas) == [5.0, 50.0]
  assert lambdas[info["lambda"]] == max(lambdas.values())
  assert info["spread_towers"] > 0 and info["spread_ease"] > 0
  assert pipeline.exported_variant(blend_run) == name
  # The exported blend holds EASE refitted on training plus validation
  # events, divided by those events' counts to the chosen power.
  config, prep = pipeline.open_run(blend_run)
  view = pipeline.refit_view(prep, config.train)
  assert not np.array_equal(view.item_counts, prep.item_counts)
  saved = pipeline.load_blend(blend_run, name)
  columns, values = next(blend_lib.ease_tables(view, [info["lambda"]],
                                                   30))
  np.testing.assert_array_equal(saved.columns, columns)
  expected = ease_lib.popularity_scaled(
      columns, values, view.item_counts, info["popularity_power"])
  np.testing.assert_allclose(
      saved.values, expected * np.float32(info["w"] / info["spread_ease"]),
      rtol=1e-5, atol=1e-8)
  assert saved.tower_scale == pytest.approx(
      (1 - info["w"]) / info["spread_towers"])
  # `tt-mimic evaluate` reloads the blend and reproduces its test metrics.
  with flagsaver.flagsaver(model_dir=blend_run, eval_split="test",
                           variant="exported"):
    evaluate_command.main(["evaluate"])
  evaluated = _json(blend_run, f"evaluate_{name}_test.json")
  for metric in ("recall@20", "ndcg@20", "mrr"):
    assert evaluated[metric] == pytest.approx(metrics[name][metric],
                                              abs=1e-6), metric


def test_a_run_without_the_blend_never_exports_an_old_one(blend_run, tmp_path):
  copy = str(tmp_path / "run")
  shutil.copytree(blend_run, copy)
  name = "dat_refit" + pipeline.BLEND_SUFFIX
  forced = _forced(copy, 0.5, 0.0).blend
  blend_lib.save(forced, forced.info, copy, name)
  config = json.loads(open(os.path.join(copy, "config.json")).read())
  assert pipeline.exported_variant(copy) == name
  config["train"]["ease_weights"] = []
  with open(os.path.join(copy, "config.json"), "w") as f:
    json.dump(config, f)
  assert pipeline.exported_variant(copy) == "dat_refit"


def _forced(model_dir: str, w: float, power: float) -> pipeline.Built:
  """The run's dat_refit blended with EASE at weight `w` and popularity
  power `power` (whatever validation chose), as training builds it."""
  config, prep = pipeline.open_run(model_dir)
  view = pipeline.refit_view(prep, config.train)
  towers = pipeline.load_variant(model_dir, config, view, "dat_refit")
  columns, values = next(blend_lib.ease_tables(view, [5.0], 30))
  parts = blend_lib._Parts(towers, view.val, len(view.data.items), 64,  # pylint: disable=protected-access
                           {"lambda": 5.0})
  return parts.blend(parts.ease(columns, values, view.item_counts, power), w)


def test_the_export_serves_the_blend_it_evaluates(blend_run, tmp_path):
  copy = str(tmp_path / "run")
  shutil.copytree(blend_run, copy)
  shutil.rmtree(os.path.join(copy, "export"), ignore_errors=True)
  config, prep = pipeline.open_run(copy)
  view = pipeline.refit_view(prep, config.train)
  built = _forced(copy, 0.5, 0.5)
  assert 0 < built.blend.tower_scale
  export.export_run(copy, view, built, ExportConfig(k=20, max_exclusions=30),
                    model="dat_refit_ease")
  info = _json(copy, "export", "export.json")
  assert info["blend"]["w"] == 0.5
  assert info["blend"]["popularity_power"] == 0.5
  # Anonymous users with a given history: the towers read its latest
  # books, EASE all of them.
  items = view.data.items["parent_asin"].to_numpy(dtype=str)
  test = view.test
  rows = range(0, min(len(test), 24), 3)
  histories = [items[np.asarray(test.seen[r]) - 1].tolist() for r in rows]
  serving = tf.saved_model.load(recommender.serving_path(
      os.path.join(copy, "export"), 1))
  width = max(len(h) for h in histories)
  padded = tf.constant([h + [""] * (width - len(h)) for h in histories])
  got = serving.signatures["with_history"](
      user_id=tf.constant([""] * len(histories)), history=padded,
      exclude=tf.constant([[""]] * len(histories)))
  scorer = pipeline.model_scorer(built, len(items))
  h = view.feature_config.history_length
  seen = [np.asarray(test.seen[r], np.int64) for r in rows]
  batch = {"user_id": tf.zeros([len(seen)], tf.int64),
           "history": tf.constant(np.stack([
               np.pad(s[::-1][:h], (0, max(0, h - len(s)))) for s in seen])),
           "seen": tf.ragged.constant(seen, dtype=tf.int64)}
  expected = scorer(batch).numpy()
  expected[:, 0] = -np.inf
  index = {a: i + 1 for i, a in enumerate(items)}
  recs = recommender.Recommender(copy, index="scann")
  for i, history in enumerate(histories):
    ids = [a.decode() for a in got["parent_asin"].numpy()[i]]
    scores = got["scores"].numpy()[i]
    # Brute force: exactly the evaluated blend's top 20 (read books too:
    # nothing is excluded), with its scores.
    top = np.argsort(-expected[i], kind="stable")[:20]
    np.testing.assert_allclose(scores, expected[i][top], rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(expected[i][[index[a] for a in ids]], scores,
                               rtol=1e-4, atol=1e-4)
    # ScaNN: its top 50 books and EASE's top 50, re-scored exactly.
    answer = recs.recommend(history=history, k=20, exclude_seen=False)
    found = {row["parent_asin"]: row["score"] for row in answer}
    assert len(set(found) & set(ids)) >= 18
    for asin, score in found.items():
      assert score == pytest.approx(expected[i][index[asin]], abs=1e-4)
  # More exclusions than the books retrieved (50): the next best 20 books,
  # still exact.
  top = np.argsort(-expected[0], kind="stable")
  excluded = tf.constant([items[top[:60] - 1].tolist()])
  out = serving.signatures["with_history"](
      user_id=tf.constant([""]), history=padded[:1], exclude=excluded)
  assert [a.decode() for a in out["parent_asin"].numpy()[0]] == (
      items[top[60:80] - 1].tolist())
  # The catalog's new books score by the towers alone (no EASE weights):
  # the new version serves the same scores for the books it had.
  csv, new = tiny_data.write_new_books(tmp_path)
  result = catalog.add_books(copy, csv)
  assert result.version == 2 and len(result.added) == len(new)
  grown = recommender.Recommender(copy, index="brute_force")
  for i, history in enumerate(histories[:3]):
    for row in grown.recommend(history=history, k=20, exclude_seen=False):
      if row["parent_asin"] in index:
        assert row["score"] == pytest.approx(
            expected[i][index[row["parent_asin"]]], abs=1e-4)


def test_neighbourhood_ease_above_the_cap(blend_run):
  config, prep = pipeline.open_run(blend_run)
  view = pipeline.refit_view(prep, config.train)
  dat = pipeline.load_variant(blend_run, config, prep, "dat")
  towers = pipeline.load_variant(blend_run, config, view, "dat_refit")
  capped = dataclasses.replace(
      config.train, ease_max_items=3, ease_lambdas=(5.0,),
      ease_popularity_powers=(0.0,), ease_weights=WEIGHTS, ease_neighbours=0)
  with pytest.raises(ease_lib.TooManyItemsError, match="ease_neighbours"):
    blend_lib.fit(prep, view, dat, towers, capped)
  wide = dataclasses.replace(capped, ease_neighbours=6,
                             ease_lambdas=(5.0, 50.0))
  built, info = blend_lib.fit(prep, view, dat, towers, wide)
  assert info["neighbours"] == 6
  # Validation scored the neighbourhood EASE of each lambda (fitted
  # together), not the exact one.
  n = len(prep.data.items)
  scored = []
  for lam in (5.0, 50.0):
    alone = next(blend_lib.ease_tables(prep, [lam], 30, 6))
    val = evaluation.evaluate(pipeline.ease_scorer(*alone, n), prep.val,
                              batch_size=config.train.eval_batch_size)
    scored.append({"lambda": lam, "recall@20": val["recall@20"]})
  assert info["lambdas"] == scored
  assert info["lambda"] in (5.0, 50.0)
  tables = next(blend_lib.ease_tables(prep, [5.0], 30, 6))
  # Its weights differ from exact EASE's: six neighbours of many books.
  batch = next(iter(prep.val.dataset(64)))
  seen = pipeline.batch_seen(batch)
  assert not np.allclose(
      ease_lib.scores(*tables, seen, n).numpy(),
      ease_lib.scores(*next(blend_lib.ease_tables(prep, [5.0], 30)), seen,
                      n).numpy(),
      atol=1e-3)
  if built is None:  # validation preferred the towers alone
    assert info["w"] == 0.0
    return
  # The export's tables: neighbourhood EASE refitted on training plus
  # validation, scaled as chosen.
  columns, values = next(blend_lib.ease_tables(view, [info["lambda"]], 30,
                                               6))
  np.testing.assert_array_equal(built.blend.columns, columns)
  np.testing.assert_allclose(
      built.blend.values, ease_lib.popularity_scaled(
          columns, values, view.item_counts, info["popularity_power"])
      * np.float32(info["w"] / info["spread_ease"]), rtol=1e-5, atol=1e-8)
