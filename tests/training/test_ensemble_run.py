"""--ensemble: the exported model is its members together, in training,
evaluation and the export alike."""

import dataclasses
import json
import os

from absl import flags
from absl.testing import flagsaver
import numpy as np
import pytest

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf

from tt_mimic.commands import evaluate as evaluate_command
from tt_mimic.commands import train
from tt_mimic.data import features
from tt_mimic.serving import recommender
from tt_mimic.training import pipeline

import tiny_data

FLAGS = flags.FLAGS


def _train(tmp_path_factory, name: str, **flag_values) -> str:
  """A tiny exported run of dat with two members; returns its directory."""
  if not FLAGS.is_parsed():
    FLAGS.mark_as_parsed()
  root = tmp_path_factory.mktemp(name)
  dataset = tiny_data.write_dataset(root, "small")
  model_dir = str(root / "run")
  values = tiny_data.train_flags(dataset, model_dir, epochs=2, patience=0,
                                 variants=["popularity", "dat"], ensemble=2,
                                 export=True, export_k=20, **flag_values)
  with flagsaver.flagsaver(**values):
    train.main(["train"])
  return model_dir


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
  """dat, its refit and a second member (four query vectors each)."""
  return _train(tmp_path_factory, "ensemble", refit=True, interests=4)


def _json(*parts):
  with open(os.path.join(*parts)) as f:
    return json.load(f)


def test_members_are_trained_with_their_own_seeds(ensemble_run):
  metrics = _json(ensemble_run, "metrics.json")
  assert {"dat_refit", "dat_refit_2", "dat_refit_ensemble"} <= metrics.keys()
  first = _json(ensemble_run, "variants", "dat_refit", "settings.json")
  second = _json(ensemble_run, "variants", "dat_refit_2", "settings.json")
  assert second["train"]["seed"] == pipeline.member_seed(
      first["train"]["seed"], 2) != first["train"]["seed"]
  # The member trains the refit's epochs, which validation chose for dat.
  assert second["refit_epochs"] == first["refit_epochs"] == _json(
      ensemble_run, "variants", "dat", "result.json")["best_epoch"]
  config, prep = pipeline.open_run(ensemble_run)
  view = pipeline.refit_view(prep, config.train)
  a = pipeline.load_variant(ensemble_run, config, view, "dat_refit")
  b = pipeline.load_variant(ensemble_run, config, view, "dat_refit_2")
  assert not np.allclose(a.item_tower.item_id.embeddings.numpy(),
                         b.item_tower.item_id.embeddings.numpy())


def test_the_ensemble_is_exported_and_evaluates_as_trained(ensemble_run):
  assert pipeline.exported_variant(ensemble_run) == "dat_refit_ensemble"
  with flagsaver.flagsaver(model_dir=ensemble_run, eval_split="test",
                           variant="exported"):
    evaluate_command.main(["evaluate"])
  evaluated = _json(ensemble_run, "evaluate_dat_refit_ensemble_test.json")
  trained = _json(ensemble_run, "metrics.json")["dat_refit_ensemble"]
  for name in ("recall@20", "ndcg@20", "mrr"):
    assert evaluated[name] == pytest.approx(trained[name], abs=1e-6), name
  with flagsaver.flagsaver(model_dir=ensemble_run, eval_split="val",
                           variant="exported"):
    with pytest.raises(SystemExit, match="trained on the validation events"):
      evaluate_command.main(["evaluate"])


def test_the_export_scores_the_sum_of_the_members(ensemble_run):
  """The exported query vectors against the exported book vectors give, for
  each book, the members' best scores added up."""
  config, prep = pipeline.open_run(ensemble_run)
  view = pipeline.refit_view(prep, config.train)
  members = [pipeline.load_variant(ensemble_run, config, view, name)
             for name in ("dat_refit", "dat_refit_2")]
  export = os.path.join(ensemble_run, "export")
  books = np.load(os.path.join(export, "embeddings.npy"))
  assert books.shape[1] == 2 * config.tower.output_dim
  serving = tf.saved_model.load(recommender.serving_path(export, 1))
  users, history = view.test.users[:5], view.test.history[:5]
  asins = np.r_[[""], view.data.items["parent_asin"].to_numpy(str)]
  query = serving.signatures["query"](
      user_id=tf.constant(view.data.users[users - 1].astype(str)),
      # The signature takes a history in time order (ours: latest first).
      history=tf.constant(asins[history[:, ::-1]]))["embedding"].numpy()
  assert query.shape == (len(users), 16, 2 * config.tower.output_dim)
  exported = np.einsum("bkd,nd->bkn", query, books).max(1)
  batch = {"user_id": tf.constant(view.test.user_id[:5]),
           "history": tf.constant(history)}
  summed = pipeline.model_scorer(pipeline.ensemble(members),
                                 len(view.data.items))(batch).numpy()[:, 1:]
  np.testing.assert_allclose(exported, summed, atol=1e-4)
  # The candidate SavedModel embeds raw books as the export did.
  raw = features.raw_item_features(view.data.items.iloc[:4],
                                   config.features)
  candidate = recommender.load_candidate(export).signatures[
      "serving_default"](**{k: tf.constant(v) for k, v in raw.items()})
  np.testing.assert_allclose(candidate["embedding"].numpy(), books[:4],
                             atol=1e-5)
  assert _json(export, "export.json")["provenance"]["model"] == (
      "dat_refit_ensemble")
  recs = recommender.Recommender(ensemble_run, "scann")
  assert len(recs.recommend(None, [str(view.data.users[users[0] - 1])],
                            k=5)) == 5


@pytest.fixture(scope="module")
def plain_ensemble_run(tmp_path_factory):
  """Two members of dat without a refit, one query vector each."""
  return _train(tmp_path_factory, "plain_ensemble", refit=False, interests=1)


def test_an_ensemble_without_refit(plain_ensemble_run):
  assert pipeline.exported_variant(plain_ensemble_run) == "dat_ensemble"
  assert {"dat_2", "dat_ensemble"} <= _json(plain_ensemble_run,
                                            "metrics.json").keys()
  # Not trained on validation events: it may be evaluated there.
  with flagsaver.flagsaver(model_dir=plain_ensemble_run, eval_split="val",
                           variant="exported"):
    evaluate_command.main(["evaluate"])
  assert _json(plain_ensemble_run, "evaluate_dat_ensemble_val.json")[
      "users"] > 0
  # One vector per member: the exported query is [users, 2 x output_dim].
  config = pipeline.read_config(plain_ensemble_run)
  serving = tf.saved_model.load(recommender.serving_path(
      os.path.join(plain_ensemble_run, "export"), 1))
  query = serving.signatures["serving_default"](user_id=tf.constant(["x"]))
  assert query["parent_asin"].shape == (1, 20)
  embedding = serving.signatures["query"](
      user_id=tf.constant(["x"]), history=tf.constant([[""]]))["embedding"]
  assert embedding.shape == (1, 2 * config.tower.output_dim)


def test_a_missing_member_exports_the_first_alone(plain_ensemble_run):
  path = os.path.join(plain_ensemble_run, pipeline.CONFIG_FILE)
  with open(path) as f:
    text = f.read()
  config = pipeline.read_config(plain_ensemble_run)
  try:
    with open(path, "w") as f:
      f.write(dataclasses.replace(config, train=dataclasses.replace(
          config.train, ensemble=3)).to_json())
    assert pipeline.exported_variant(plain_ensemble_run) == "dat"
    with open(path, "w") as f:
      f.write(dataclasses.replace(config, train=dataclasses.replace(
          config.train, ensemble=1)).to_json())
    assert pipeline.exported_variant(plain_ensemble_run) == "dat"
    _, prep = pipeline.open_run(plain_ensemble_run)
    with pytest.raises(pipeline.RunError, match="not trained with --ensemble"):
      pipeline.load_variant(plain_ensemble_run, pipeline.read_config(
          plain_ensemble_run), prep, "dat_ensemble")
  finally:
    with open(path, "w") as f:
      f.write(text)


def test_a_missing_member_says_how_to_train_it(plain_ensemble_run):
  config, prep = pipeline.open_run(plain_ensemble_run)
  with pytest.raises(pipeline.RunError,
                     match=r"--variants=\.\.\.,dat --ensemble=3 --norefit\)"):
    pipeline.load_variant(plain_ensemble_run, config, prep, "dat_3")
