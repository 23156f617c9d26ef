"""The command layer: flags from the configs, flagfiles, the entry point."""

import dataclasses
import glob
import importlib
import json
import os
import subprocess
import sys

from absl import flags
from absl.testing import flagsaver
import pytest

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
from tt_mimic import config as config_lib
from tt_mimic.commands import common
from tt_mimic.commands import main as main_lib
from tt_mimic.commands import run_dir

import tiny_data

FLAGS = flags.FLAGS
REPO = tiny_data.REPO
FLAGFILES = sorted(glob.glob(os.path.join(REPO, "flags", "*.cfg")))
# synth has its own flags (it writes data; it reads no run flagfile).
RUN_COMMANDS = [c for c in main_lib.COMMANDS if c != "synth"]


def setup_module():
  if not FLAGS.is_parsed():
    FLAGS.mark_as_parsed()


def _flag_names(args: list[str]) -> set[str]:
  """Flag names in expanded command-line arguments (--noX as X)."""
  names = set()
  for arg in args:
    name = arg.lstrip("-").split("=", 1)[0]
    if name not in FLAGS and name.startswith("no") and name[2:] in FLAGS:
      name = name[2:]
    names.add(name)
  return names


def test_there_are_flagfiles():
  assert {os.path.basename(f) for f in FLAGFILES} >= {
      "base.cfg", "sample.cfg", "full.cfg"}


@pytest.mark.parametrize("command", RUN_COMMANDS)
@pytest.mark.parametrize("flagfile", FLAGFILES, ids=os.path.basename)
def test_every_flagfile_parses_with_every_command(command, flagfile,
                                                  monkeypatch):
  monkeypatch.chdir(REPO)  # flagfiles name each other relative to the repo
  module = importlib.import_module(f"tt_mimic.commands.{command}")
  known = {f.name for name in (common.__name__, module.__name__)
           for f in FLAGS.get_flags_for_module(name)}
  args = FLAGS.read_flags_from_files([f"--flagfile={flagfile}"],
                                     force_gnu=False)
  unknown = _flag_names(args) - known
  assert not unknown, f"{command} does not define {sorted(unknown)}"
  with flagsaver.flagsaver():
    FLAGS([f"tt-mimic {command}", f"--flagfile={flagfile}"])
    config = common.run_config()
    common.serve_config()
  assert isinstance(config, config_lib.RunConfig)


def test_flags_take_their_defaults_from_the_configs():
  for cls in list(config_lib.SECTIONS.values()) + [config_lib.ServeConfig]:
    for field in dataclasses.fields(cls):
      name = field.metadata.get("flag") or field.name
      default = FLAGS[name].default
      if isinstance(field.default, tuple):
        default = tuple(type(field.default[0])(v) for v in default)
      assert default == field.default, name


def test_default_flags_give_the_default_configs():
  with flagsaver.flagsaver():
    FLAGS(["tt-mimic"])
    assert common.run_config() == config_lib.RunConfig()
    assert common.serve_config() == config_lib.ServeConfig()


def test_base_cfg_matches_the_code_defaults(monkeypatch):
  # base.cfg documents the defaults; it must say what the code does.
  monkeypatch.chdir(REPO)
  with flagsaver.flagsaver():
    FLAGS(["tt-mimic", "--flagfile=flags/base.cfg"])
    assert common.run_config() == config_lib.RunConfig()
    assert common.serve_config() == config_lib.ServeConfig()
    listed = set(_flag_names(FLAGS.read_flags_from_files(
        ["--flagfile=flags/base.cfg"], force_gnu=False)))
    assert set(common.SERVE_FLAGS) <= listed
    # Every setting is listed, so base.cfg is the whole list of defaults.
    settings = {f.name for cls in config_lib.SECTIONS.values()
                for f in dataclasses.fields(cls)}
    assert settings <= listed, sorted(settings - listed)


def test_base_cfg_check_can_fail(monkeypatch, tmp_path):
  # The check above compares values: a base.cfg that drifts must fail it.
  monkeypatch.chdir(REPO)
  drifted = tmp_path / "base.cfg"
  drifted.write_text(open("flags/base.cfg").read() + "--history_length=20\n")
  with flagsaver.flagsaver():
    FLAGS(["tt-mimic", f"--flagfile={drifted}"])
    assert common.run_config() != config_lib.RunConfig()


@pytest.mark.parametrize("values,message", [
    ({"recent_length": 5, "history_length": 5}, "smaller than --history_length"),
    ({"history_length": 0, "user_id_embedding": False},
     "no input that tells users apart"),
    ({"history_length": 0, "interests": 2, "user_id_embedding": True},
     "needs a history to pool"),
    ({"split": "random"}, "'random' is not one of"),
    ({"temperature": 0.0}, "below"),
    ({"hidden_units": (0,)}, "below 1"),
    ({"variants": ("dat", "bogus")}, "'bogus' is not one of"),
])
def test_command_line_and_python_refuse_the_same(values, message):
  sections = {"recent_length": "tower", "history_length": "features",
              "user_id_embedding": "tower", "split": "ingest",
              "temperature": "loss", "hidden_units": "tower",
              "variants": "train", "interests": "tower"}
  with pytest.raises(ValueError, match=message):
    parts = {}
    for name, value in values.items():
      parts.setdefault(sections[name], {})[name] = value
    config_lib.RunConfig(**{s: config_lib.SECTIONS[s](**v)
                            for s, v in parts.items()})
  argv = ["tt-mimic"]
  for name, value in values.items():
    if isinstance(value, bool):
      argv.append(f"--{name}" if value else f"--no{name}")
    elif isinstance(value, tuple):
      argv.append(f"--{name}={','.join(map(str, value))}")
    else:
      argv.append(f"--{name}={value}")
  with flagsaver.flagsaver():
    with pytest.raises(flags.Error, match=message):
      FLAGS(argv)


def test_recent_length_must_be_below_history_length():
  with flagsaver.flagsaver(history_length=0, recent_length=0, interests=1,
                           user_id_embedding=True):
    assert common.run_config().features.history_length == 0
  with flagsaver.flagsaver(history_length=5, recent_length=4):
    assert common.run_config().tower.recent_length == 4
  with pytest.raises(flags.IllegalFlagValueError,
                     match="smaller than --history_length"):
    with flagsaver.flagsaver(history_length=5, recent_length=5):
      pass


def test_users_need_a_history_or_an_id_embedding():
  with flagsaver.flagsaver(history_length=5, user_id_embedding=False):
    assert not common.run_config().tower.user_id_embedding
  with pytest.raises(flags.IllegalFlagValueError,
                     match="no input that tells users apart"):
    with flagsaver.flagsaver(history_length=0, user_id_embedding=False):
      pass


def test_run_config_json_round_trip():
  config = config_lib.RunConfig(
      tower=config_lib.TowerConfig(hidden_units=(32, 16)),
      train=config_lib.TrainConfig(variants=("popularity", "dat")))
  again = config_lib.RunConfig.from_json(config.to_json())
  assert again == config
  with pytest.raises(ValueError, match="Unknown TrainConfig fields"):
    config_lib.RunConfig.from_json('{"train": {"bogus": 1}}')


def test_a_run_config_without_a_newer_setting_reads_as_made():
  # config.json of a run made before --interests and --ema_momentum
  # existed: one query vector and raw weights, not today's defaults.
  raw = json.loads(config_lib.RunConfig().to_json())
  del raw["tower"]["interests"], raw["train"]["ema_momentum"]
  old = config_lib.RunConfig.from_json(json.dumps(raw))
  assert old.tower.interests == 1 and old.train.ema_momentum == 0.0
  assert config_lib.RunConfig().tower.interests > 1


def _tt_mimic(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "tt_mimic", *args],
                        capture_output=True, text=True, timeout=300, cwd=cwd,
                        check=False)


def test_entry_point_lists_commands_and_refuses_unknown_ones():
  result = _tt_mimic("--help")
  assert result.returncode == 0
  for command in main_lib.COMMANDS:
    assert f"  {command} " in result.stdout
  result = _tt_mimic("bogus")
  assert result.returncode == 2
  assert "unknown command 'bogus'" in result.stderr


def test_command_help_lists_its_flags_and_the_run_flags():
  result = _tt_mimic("evaluate", "--help")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "--eval_split" in result.stdout  # the command's own
  assert "--batch_size" in result.stdout and "--books_csv" in result.stdout


def test_ingest_command_runs_with_the_sample_flagfile(tmp_path, tiny_dataset):
  # The documented `make ingest FLAGFILE=flags/sample.cfg`, on tiny data.
  result = _tt_mimic("ingest", "--flagfile=flags/sample.cfg",
                     f"--books_csv={tiny_dataset.books_csv}",
                     f"--users_csv={tiny_dataset.users_csv}",
                     "--min_user_interactions=1", "--min_item_interactions=1",
                     f"--model_dir={tmp_path / 'run'}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert (tmp_path / "run" / "ingest_report.json").exists()


_MAKE_RUN_TARGETS = ("train", "ingest", "export", "evaluate", "recommend",
                     "serve", "catalog")


@pytest.mark.parametrize("flagfile,expected", [
    ("flags/sample.cfg", "saved_models/sample"),
    ("flags/full.cfg", "saved_models/full"),
    ("flags/base.cfg", "saved_models/run"),  # names none: the flag's default
    ("nested.cfg", "saved_models/full"),
    ("overriding.cfg", "/tmp/elsewhere"),
])
def test_make_uses_the_run_directory_its_flagfile_names(tmp_path, flagfile,
                                                        expected):
  # `make ingest FLAGFILE=flags/full.cfg` once ingested into
  # saved_models/sample (make's --model_dir came after the flagfile's), and
  # `make recommend` after it read the sample's run.
  if subprocess.run(["make", "--version"], capture_output=True).returncode:
    pytest.skip("no make")
  (tmp_path / "nested.cfg").write_text(
      f"# a user's flagfile on top of full.cfg\n"
      f"--flagfile={REPO}/flags/full.cfg\n--epochs=3\n")
  (tmp_path / "overriding.cfg").write_text(
      f"--flagfile={REPO}/flags/full.cfg\n--model_dir=/tmp/elsewhere\n")
  path = flagfile if flagfile.startswith("flags/") else tmp_path / flagfile
  commands = subprocess.run(
      ["make", "-n", "--no-print-directory", *_MAKE_RUN_TARGETS,
       f"FLAGFILE={path}", "USER=u", f"PY={sys.executable}"],
      cwd=REPO, capture_output=True, text=True, check=True).stdout
  runs = [line for line in commands.splitlines() if "tt-mimic " in line]
  assert len(runs) == len(_MAKE_RUN_TARGETS), commands
  assert all(line.split().count(f"--model_dir={expected}") == 1
             for line in runs), runs
  given = subprocess.run(
      ["make", "-n", "--no-print-directory", "recommend", f"FLAGFILE={path}",
       "MODEL_DIR=/tmp/given", "USER=u", f"PY={sys.executable}"],
      cwd=REPO, capture_output=True, text=True, check=True).stdout
  assert "--model_dir=/tmp/given " in given


def test_run_dir_of_a_missing_flagfile_is_one_error_line(tmp_path, capsys):
  assert run_dir.main(["run_dir", str(tmp_path / "missing.cfg")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "missing.cfg" in err


@pytest.mark.parametrize("command", ["recommend", "serve", "catalog"])
def test_commands_on_an_export_name_the_run_flags_they_ignore(tmp_path,
                                                              command):
  result = _tt_mimic(command, "--flagfile=flags/sample.cfg",
                     f"--model_dir={tmp_path / 'none'}")
  assert result.returncode == 1, result.stderr[-2000:]
  assert "does not exist" in result.stderr
  line = next(line for line in result.stderr.splitlines()
              if "The run's export decides; ignoring" in line)
  ignored = line.split("ignoring ", 1)[1].rstrip(".").split(", ")
  assert "--output_dim" in ignored and "--users_csv" in ignored
  # catalog reads the new books from --books_csv.
  assert ("--books_csv" in ignored) == (command != "catalog")


def test_a_bad_flag_value_is_one_clear_line():
  result = _tt_mimic("ingest", "--history_length=3", "--recent_length=3")
  assert result.returncode == 1
  assert "smaller than --history_length" in result.stderr
  assert "Traceback" not in result.stderr
