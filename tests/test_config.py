"""Stamps of run directories: settings added later keep old runs valid."""

import dataclasses
import json
import os
import shutil

import pytest

from tt_mimic import config
from tt_mimic.training import trainer


def _stamp(**changes):
  """A run stamp (as trainer._claim writes) with settings changed."""
  sections = {"features": config.FeatureConfig(), "tower": config.TowerConfig(),
              "train": config.TrainConfig()}
  out = {"refit_epochs": 0}
  for name, section in sections.items():
    mine = {k: v for k, v in changes.items()
            if k in {f.name for f in dataclasses.fields(section)}}
    out[name] = dataclasses.asdict(dataclasses.replace(section, **mine))
  return out


def test_equal_stamps_match_and_tuples_equal_lists():
  tower = dataclasses.asdict(config.TowerConfig(hidden_units=(64, 32)))
  saved = json.loads(json.dumps(tower))
  assert isinstance(saved["hidden_units"], list)
  assert config.same_settings(saved, tower)


def test_a_setting_newer_than_the_stamp_matches_only_at_its_default():
  saved = _stamp()
  del saved["tower"]["history_item_dropout"]
  assert config.same_settings(saved, _stamp())
  assert not config.same_settings(saved, _stamp(history_item_dropout=0.5))


def test_a_setting_added_with_a_new_default_matches_the_old_behaviour():
  # Titles were ASCII-standardized before --title_standardize existed; its
  # default is now unicode.
  assert config.FeatureConfig().title_standardize == "unicode"
  saved = _stamp()
  del saved["features"]["title_standardize"]
  assert not config.same_settings(saved, _stamp())
  assert config.same_settings(saved, _stamp(title_standardize="ascii"))
  # No weight averaging before --ema_momentum existed; it is on by default.
  assert config.TrainConfig().ema_momentum > 0
  saved = _stamp()
  del saved["train"]["ema_momentum"]
  assert not config.same_settings(saved, _stamp())
  assert config.same_settings(saved, _stamp(ema_momentum=0.0))
  # Training histories were causal before --train_history existed.
  assert config.TrainConfig().train_history == "other"
  saved = _stamp()
  del saved["train"]["train_history"]
  assert not config.same_settings(saved, _stamp())
  assert config.same_settings(saved, _stamp(train_history="causal"))


def _old_layout(stamp: dict) -> dict:
  """`stamp` as written before train_history moved from the feature
  settings to the training ones (2026-12-06)."""
  stamp = json.loads(json.dumps(stamp))
  stamp["features"]["train_history"] = stamp["train"].pop("train_history")
  return stamp


def test_a_moved_setting_matches_from_its_old_section():
  assert "train_history" not in _stamp()["features"]
  for mode in ("other", "causal"):
    saved = _old_layout(_stamp(train_history=mode))
    assert config.same_settings(saved, _stamp(train_history=mode))
    other = "causal" if mode == "other" else "other"
    assert not config.same_settings(saved, _stamp(train_history=other))
  # A stamp of features only (the preprocessing state's) ignores it.
  saved = _old_layout(_stamp(train_history="causal"))
  assert config.same_settings({"features": saved["features"]},
                              {"features": _stamp()["features"]})


def test_a_saved_config_of_the_old_layout_loads():
  # "other" is not the setting's BEFORE_SETTING value, so a loader that
  # dropped the old section's value instead of moving it would fail here.
  run = config.RunConfig(train=config.TrainConfig(train_history="other"))
  raw = _old_layout(json.loads(run.to_json()))
  assert config.RunConfig.from_json(json.dumps(raw)) == run
  # Saved before the setting existed: causal, what the code did then.
  del raw["features"]["train_history"]
  loaded = config.RunConfig.from_json(json.dumps(raw))
  assert loaded.train.train_history == "causal"


def test_changed_removed_or_unknown_settings_do_not_match():
  assert not config.same_settings(_stamp(), _stamp(history_length=7))
  saved = _stamp()
  saved["features"]["no_such_setting"] = 1
  assert not config.same_settings(saved, _stamp())
  saved = _stamp()
  saved["no_such_section_value"] = 3
  assert not config.same_settings(saved, _stamp())
  # A missing key that is no setting at all has no default to match.
  saved = _stamp()
  del saved["refit_epochs"]
  assert not config.same_settings(saved, _stamp())


def test_claim_keeps_a_run_made_before_a_new_setting(tmp_path):
  directory = str(tmp_path / "variant")
  trainer._claim(directory, _stamp())
  marker = os.path.join(directory, "weights")
  open(marker, "w").close()
  path = os.path.join(directory, "settings.json")
  with open(path) as f:
    old = json.load(f)
  del old["tower"]["history_item_dropout"]
  with open(path, "w") as f:
    json.dump(old, f)
  trainer._claim(directory, _stamp())
  assert os.path.exists(marker)
  trainer._claim(directory, _stamp(history_item_dropout=0.5))
  assert not os.path.exists(marker)


def test_claim_keeps_a_variant_when_only_refit_differs(tmp_path):
  # A dat trained with --norefit is the same model with --refit: the refit
  # is a variant of its own (with its refit_epochs).
  directory = str(tmp_path / "variant")
  trainer._claim(directory, _stamp(refit=False))
  marker = os.path.join(directory, "weights")
  open(marker, "w").close()
  with open(os.path.join(directory, "settings.json")) as f:
    assert "refit" not in json.load(f)["train"]
  trainer._claim(directory, _stamp(refit=True))
  assert os.path.exists(marker)
  # A stamp written before, with refit (and verbose 0, variants None) in
  # it, is kept too, whatever the progress output and variants now.
  old = _stamp(refit=False)
  old["train"].update(verbose=0, variants=None)
  with open(os.path.join(directory, "settings.json"), "w") as f:
    json.dump(old, f)
  trainer._claim(directory, _stamp(refit=True, verbose=2,
                                   variants=("dat",)))
  assert os.path.exists(marker)
  # Every other setting still counts.
  trainer._claim(directory, _stamp(refit=True, batch_size=7))
  assert not os.path.exists(marker)


def test_claim_compares_input_files_not_their_spelling(tmp_path,
                                                      monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs("data")
  for name in ("books.csv", "users.csv", "other.csv"):
    open(os.path.join("data", name), "w").close()

  def stamp(books, users="data/users.csv"):
    return {**_stamp(), "data": {"books_csv": books, "users_csv": users,
                                 "min_rating": 0.0}}
  directory = str(tmp_path / "variant")
  trainer._claim(directory, stamp("data/books.csv"))
  marker = os.path.join(directory, "weights")
  open(marker, "w").close()
  # The same files, spelled absolute or through "./": kept.
  trainer._claim(directory, stamp(str(tmp_path / "data" / "books.csv"),
                                  "./data/users.csv"))
  assert os.path.exists(marker)
  # The stamp keeps the spelling it was written with: a relative path
  # follows the working directory (a project moved with its data resumes).
  with open(os.path.join(directory, "settings.json")) as f:
    assert json.load(f)["data"]["books_csv"] == "data/books.csv"
  shutil.copytree(tmp_path / "data", tmp_path / "moved" / "data")
  monkeypatch.chdir(tmp_path / "moved")
  trainer._claim(directory, stamp("data/books.csv"))
  assert os.path.exists(marker)
  # Another file: cleared.
  trainer._claim(directory, stamp("data/other.csv"))
  assert not os.path.exists(marker)


def test_an_ensemble_is_capped_by_its_query_vectors():
  """interests^members query vectors: 4^3 = 64 is allowed, 4^4 = 256 not."""
  def run(interests, ensemble):
    return config.RunConfig(
        tower=config.TowerConfig(interests=interests),
        train=config.TrainConfig(ensemble=ensemble))
  assert run(4, 3).train.ensemble == 3
  assert run(1, 4).train.ensemble == 4
  with pytest.raises(ValueError, match="256 query vectors"):
    run(4, 4)


def test_a_blend_needs_a_popularity_power():
  assert config.TrainConfig().ease_popularity_powers[0] == 0.0
  config.TrainConfig(ease_weights=(), ease_popularity_powers=())
  with pytest.raises(ValueError, match="--ease_popularity_powers"):
    config.TrainConfig(ease_popularity_powers=())
  with pytest.raises(ValueError, match="above 2.0"):
    config.TrainConfig(ease_popularity_powers=(0.0, 3.0))
