"""A run directory stands on its own: re-export, evaluate and recommend
work after the source CSVs are moved away."""

import json
import os
import shutil

from absl import app
from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
from tt_mimic import config as config_lib
from tt_mimic.commands import evaluate as evaluate_command
from tt_mimic.commands import export as export_command
from tt_mimic.commands import train
from tt_mimic.serving import recommender
from tt_mimic.training import pipeline

import tiny_data

FLAGS = flags.FLAGS


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory):
  """A tiny trained and exported run whose source CSVs were moved away."""
  if not FLAGS.is_parsed():
    FLAGS.mark_as_parsed()
  root = tmp_path_factory.mktemp("run_dir")
  source = root / "source"
  source.mkdir()
  dataset = tiny_data.write_dataset(source, "small")
  model_dir = str(root / "run")
  values = tiny_data.train_flags(dataset, model_dir, epochs=1,
                                 variants=["popularity", "dat"], export=True,
                                 refit=True, export_k=20,
                                 cache_dir=str(root / "cache"))
  with flagsaver.flagsaver(**values):
    train.main(["train"])
  shutil.move(str(source), str(root / "moved"))
  shutil.rmtree(root / "cache")  # the run keeps its own copy
  return model_dir


def _json(*parts):
  with open(os.path.join(*parts)) as f:
    return json.load(f)


def test_the_run_holds_its_config_and_state(moved_run):
  config = pipeline.read_config(moved_run)
  assert config.tower.embedding_dim == 8
  assert config.train.variants == ("popularity", "dat")
  assert config.export.k == 20
  for name in ("vocabularies.json", "item_table.npz", "state.json"):
    assert os.path.exists(os.path.join(moved_run, "preprocessing", name))
  ingest_dir = _json(moved_run, "run.json")["ingest_dir"]
  assert not ingest_dir.startswith("..")  # inside the run


def test_reexport_without_the_csvs(moved_run):
  before = np.load(os.path.join(moved_run, "export", "embeddings.npy"))
  shutil.rmtree(os.path.join(moved_run, "export"))
  with flagsaver.flagsaver(model_dir=moved_run, export_k=10):
    export_command.main(["export"])
  after = np.load(os.path.join(moved_run, "export", "embeddings.npy"))
  np.testing.assert_allclose(after, before, atol=1e-6)
  # --export_k given to the command overrides the run's export config.
  assert _json(moved_run, "export", "export.json")["k"] == 10
  recs = recommender.Recommender(moved_run, "brute_force")
  user = str(recs.items["parent_asin"].iloc[0])
  assert len(recs.recommend(None, [user], k=5)) == 5


def test_evaluate_without_the_csvs_repeats_training(moved_run):
  with flagsaver.flagsaver(model_dir=moved_run, eval_split="test",
                           variant="dat"):
    evaluate_command.main(["evaluate"])
  evaluated = _json(moved_run, "evaluate_dat_test.json")
  trained = _json(moved_run, "variants", "dat", "result.json")["test"]
  assert evaluated.keys() == trained.keys()
  assert evaluated["segments"] == trained["segments"]
  for name, value in trained.items():
    if name != "segments":
      assert evaluated[name] == pytest.approx(value, abs=1e-6), name


def test_the_exported_model_is_the_refit_and_evaluates_alike(moved_run):
  assert pipeline.exported_variant(moved_run) == "dat_refit"
  with flagsaver.flagsaver(model_dir=moved_run, eval_split="test",
                           variant="exported"):
    evaluate_command.main(["evaluate"])
  evaluated = _json(moved_run, "evaluate_dat_refit_test.json")
  trained = _json(moved_run, "variants", "dat_refit", "result.json")["test"]
  assert evaluated["recall@20"] == pytest.approx(trained["recall@20"],
                                                 abs=1e-6)
  with flagsaver.flagsaver(model_dir=moved_run, eval_split="val",
                           variant="exported"):
    with pytest.raises(SystemExit, match="trained on the validation events"):
      evaluate_command.main(["evaluate"])


def test_evaluate_at_any_cutoffs(moved_run, capsys):
  with flagsaver.flagsaver(model_dir=moved_run, eval_split="val",
                           variant="dat", ks=["7", "3", "20"]):
    evaluate_command.main(["evaluate"])
  evaluated = _json(moved_run, "evaluate_dat_val.json")
  for k in (3, 7, 20):
    for name in ("recall", "ndcg", "hr"):
      assert 0.0 <= evaluated[f"{name}@{k}"] <= 1.0
  assert "recall@10" not in evaluated
  assert evaluated["recall@3"] <= evaluated["recall@7"] <= evaluated[
      "recall@20"]
  # The same cut-off as training's validation gives its number.
  history = _json(moved_run, "variants", "dat", "result.json")["history"]
  best = max(h["val_recall@20"] for h in history)
  assert evaluated["recall@20"] == pytest.approx(best, abs=1e-6)
  out = capsys.readouterr().out
  assert "| recall@3 | ndcg@3 | recall@7 |" in out and "| mrr |" in out
  with flagsaver.flagsaver(model_dir=moved_run, ks=["0"]):
    with pytest.raises(app.UsageError, match="--ks must be positive"):
      evaluate_command.main(["evaluate"])


def test_open_run_needs_a_run():
  with pytest.raises(pipeline.RunError, match="config.json not found"):
    pipeline.open_run("/nonexistent/run")


def test_a_missing_variant_is_a_clear_error(moved_run):
  config, prep = pipeline.open_run(moved_run)
  with pytest.raises(pipeline.RunError, match="no trained 'two_tower'"):
    pipeline.load_variant(moved_run, config, prep, "two_tower")
  assert isinstance(config, config_lib.RunConfig)


def test_export_json_says_where_the_export_comes_from(moved_run):
  info = _json(moved_run, "export", "export.json")["provenance"]
  assert info["package_version"] == tt_mimic.__version__
  assert info["model"] == "dat_refit"
  assert info["config"] == json.loads(
      pipeline.read_config(moved_run).to_json())
  assert info["metrics"]["dat_refit"]["recall@20"] == _json(
      moved_run, "metrics.json")["dat_refit"]["recall@20"]
  assert info["fitted_on_splits"] == [0, 1]  # the refit: train + validation
  assert info["inputs"]["books_csv"].endswith("books.csv")
  assert len(info["ingest_key"]) == 16


def test_preprocessing_state_does_not_depend_on_training_histories(
    tmp_path, monkeypatch):
  data = tiny_data.ingested(str(tmp_path))
  state = str(tmp_path / "preprocessing")
  features_config = config_lib.FeatureConfig(title_length=6, history_length=5)
  pipeline._preprocessing_state(data, features_config, state)
  # A stamp from before --train_history moved to the training settings
  # holds it among the features (here the old default).
  stamp = _json(state, "state.json")
  assert "train_history" not in stamp["features"]
  stamp["features"]["train_history"] = "causal"
  with open(os.path.join(state, "state.json"), "w") as f:
    json.dump(stamp, f)

  def rebuilt(*args):
    raise AssertionError("the preprocessing state was built again")

  monkeypatch.setattr(pipeline.features, "build_vocabularies", rebuilt)
  pipeline._preprocessing_state(data, features_config, state)
  # Any other feature setting still rebuilds it.
  with pytest.raises(AssertionError, match="built again"):
    pipeline._preprocessing_state(
        data, config_lib.FeatureConfig(title_length=7, history_length=5),
        state)
