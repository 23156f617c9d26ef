"""A run directory in use is refused; an unwritable one fails in one line
before any work."""

import os
import subprocess
import sys

from absl import flags
from absl.testing import flagsaver
import pytest

import tt_mimic  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
from tt_mimic.commands import evaluate as evaluate_command
from tt_mimic.commands import export as export_command
from tt_mimic.commands import ingest as ingest_command
from tt_mimic.commands import train
from tt_mimic.training import pipeline

import tiny_data

FLAGS = flags.FLAGS


def setup_module():
  if not FLAGS.is_parsed():
    FLAGS.mark_as_parsed()


@pytest.mark.parametrize("command", [train, ingest_command, export_command,
                                     evaluate_command])
def test_a_run_directory_in_use_is_refused(command, tiny_dataset, tmp_path):
  model_dir = str(tmp_path / "run")
  with pipeline.run_lock(model_dir):
    with flagsaver.flagsaver(**tiny_data.train_flags(tiny_dataset, model_dir)):
      with pytest.raises(SystemExit) as caught:
        command.main([command.__name__])
  message = str(caught.value)
  assert f"{model_dir} is in use by process {os.getpid()}" in message
  assert "\n" not in message
  # Nothing was written by the refused command.
  assert sorted(os.listdir(model_dir)) == [pipeline.LOCK_FILE]
  # Released: the directory can be taken again, and says nobody holds it.
  with pipeline.run_lock(model_dir):
    pass
  assert open(os.path.join(model_dir, pipeline.LOCK_FILE)).read() == ""


@pytest.mark.parametrize("command", [export_command, evaluate_command])
def test_commands_on_a_run_do_not_create_a_missing_directory(
    command, tiny_dataset, tmp_path):
  model_dir = str(tmp_path / "no_such_run")
  with flagsaver.flagsaver(**tiny_data.train_flags(tiny_dataset, model_dir)):
    with pytest.raises(SystemExit, match=f"{model_dir} does not exist"):
      command.main([command.__name__])
  assert not os.path.exists(model_dir)


def test_the_lock_names_a_holder_in_another_process(tmp_path):
  model_dir = str(tmp_path / "run")
  # The holder takes the lock the way run_lock does (flock), in a process
  # that does not import TensorFlow, so the test stays fast.
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import fcntl, os, sys, time\n"
       f"os.makedirs({model_dir!r})\n"
       f"f = open(os.path.join({model_dir!r}, '.lock'), 'a+')\n"
       "fcntl.flock(f, fcntl.LOCK_EX)\n"
       "f.write(f'process {os.getpid()} (holder)'); f.flush()\n"
       "print('held', flush=True)\n"
       "time.sleep(60)\n"],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(pipeline.RunDirBusyError,
                       match=f"in use by process {holder.pid} \\(holder\\)"):
      with pipeline.run_lock(model_dir):
        pass
  finally:
    holder.kill()
    holder.wait(timeout=30)
  # The kernel released the killed holder's lock.
  with pipeline.run_lock(model_dir):
    pass


def test_an_unwritable_run_directory_fails_before_any_work(tiny_dataset,
                                                           tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  model_dir = str(blocker / "run")
  with flagsaver.flagsaver(**tiny_data.train_flags(tiny_dataset, model_dir)):
    with pytest.raises(SystemExit) as caught:
      train.main(["train"])
  message = str(caught.value)
  assert message.startswith(f"Cannot write the run directory {model_dir}: ")
  assert "--model_dir" in message and "\n" not in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only dirs")
def test_a_read_only_run_directory_fails_before_any_work(tiny_dataset,
                                                         tmp_path):
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  model_dir.chmod(0o555)
  try:
    with flagsaver.flagsaver(**tiny_data.train_flags(tiny_dataset,
                                                     str(model_dir))):
      with pytest.raises(SystemExit, match="Permission denied"):
        train.main(["train"])
    assert not os.listdir(model_dir)
  finally:
    model_dir.chmod(0o755)
