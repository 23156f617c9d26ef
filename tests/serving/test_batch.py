"""Tests for tt_mimic.serving.batch and `tt-mimic recommend --all_users /
--users_file` on the served run (tests/serving/conftest.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os

from absl.testing import flagsaver
import numpy as np
import pyarrow.parquet as pq
import pytest

from tt_mimic import progress as progress_lib
from tt_mimic.commands import recommend as recommend_command
from tt_mimic.serving import batch
from tt_mimic.serving import recommender as recommend

pytestmark = pytest.mark.xdist_group("serving")  # see conftest.py


@pytest.fixture(scope="module")
def rec(run):
  return recommend.Recommender(run.model_dir, index="brute_force")


def test_all_users_in_chunks_match_recommend_batch(rec, users, tmp_path):
  path = str(tmp_path / "out" / "all.parquet")
  known = batch.all_users(rec)
  assert known == users
  summary = batch.write_recommendations(rec, known, path, k=5, chunk_size=7,
                                        total=len(known))
  assert summary["users"] == len(users)
  assert summary["by_source"] == {recommend.KNOWN_USER: len(users)}
  assert summary["short_users"] == summary["empty_users"] == 0
  assert not os.path.exists(path + ".tmp")
  file = pq.ParquetFile(path)
  assert file.schema_arrow == batch.SCHEMA
  assert file.metadata.num_row_groups == math.ceil(len(users) / 7)
  frame = file.read().to_pandas()
  assert len(frame) == summary["rows"] == 5 * len(users)
  assert list(frame["userId"].unique()) == users
  ranks = frame.groupby("userId", sort=False)["rank"].apply(list)
  assert all(r == [1, 2, 3, 4, 5] for r in ranks)
  for user, recs in zip(users[:9], rec.recommend_batch(users[:9], k=5)):
    mine = frame[frame["userId"] == user]
    assert list(mine["parent_asin"]) == [r["parent_asin"] for r in recs]
    np.testing.assert_allclose(mine["score"], [r["score"] for r in recs],
                               rtol=1e-6)
    assert not set(mine["parent_asin"]) & set(rec.seen(user))


def test_users_file_unknown_users_blank_lines_and_repeats(rec, users,
                                                          tmp_path):
  ids = tmp_path / "ids.txt"
  ids.write_text(f"{users[1]}\n\n  nobody  \n{users[1]}\n{users[0]}\n")
  assert list(batch.read_user_ids(str(ids))) == [users[1], "nobody",
                                                 users[0]]
  path = str(tmp_path / "file.parquet")
  summary = batch.write_recommendations(rec, batch.read_user_ids(str(ids)),
                                        path, k=3, chunk_size=2)
  frame = pq.read_table(path).to_pandas()
  assert list(frame["userId"].unique()) == [users[1], "nobody", users[0]]
  sources = dict(zip(frame["userId"], frame["source"]))
  assert sources["nobody"] == recommend.POPULARITY
  assert sources[users[0]] == recommend.KNOWN_USER
  assert summary["by_source"] == {recommend.KNOWN_USER: 2,
                                  recommend.POPULARITY: 1}


def test_bad_k_and_a_failure_leave_no_file(rec, users, tmp_path,
                                           monkeypatch):
  path = str(tmp_path / "bad.parquet")
  with pytest.raises(ValueError, match="out of range"):
    batch.write_recommendations(rec, users, path, k=rec.k + 1)

  def fail_later(chunk, *args):
    if chunk[0] != users[0]:
      raise RuntimeError("index failed")
    return recommend.Recommender.recommend_batch(rec, chunk, *args)

  monkeypatch.setattr(rec, "recommend_batch", fail_later)
  with pytest.raises(RuntimeError):
    batch.write_recommendations(rec, users, path, k=2, chunk_size=4)
  assert os.listdir(tmp_path) == []


def test_short_and_empty_answers_are_counted(rec, users, tmp_path,
                                             monkeypatch):
  def cut(chunk, *args):
    answers = recommend.Recommender.recommend_batch(rec, chunk, *args)
    for i, user in enumerate(chunk):  # users[0]: none; users[1]: one book
      if user == users[0]:
        del answers[i][:]
      elif user == users[1]:
        del answers[i][1:]
    return answers

  monkeypatch.setattr(rec, "recommend_batch", cut)
  path = str(tmp_path / "short.parquet")
  summary = batch.write_recommendations(rec, users[:5], path, k=3,
                                        chunk_size=2)
  assert summary["short_users"] == 2 and summary["empty_users"] == 1
  assert summary["users"] == 5 and summary["rows"] == 3 * 3 + 1
  frame = pq.read_table(path).to_pandas()
  assert users[0] not in set(frame["userId"])


def test_progress_lines(rec, users, tmp_path, monkeypatch):
  lines = []
  monkeypatch.setattr(progress_lib.logging, "info",
                      lambda fmt, *args: lines.append(fmt % args))
  init = progress_lib.Progress.__init__
  monkeypatch.setattr(progress_lib.Progress, "__init__",
                      lambda self, *a, **kw: init(self, *a, **{**kw,
                                                               "every": 0}))
  batch.write_recommendations(rec, users[:30], str(tmp_path / "p.parquet"),
                              k=2, chunk_size=10, total=30)
  assert lines[0].startswith("batch recommendations: 10/30 (33%) users")
  assert lines[-1].startswith("batch recommendations: 30/30 (100%) users")
  assert lines[-1].endswith("(done)")


def test_recommend_command_all_users_and_users_file(run, users, tmp_path):
  out = io.StringIO()
  with flagsaver.flagsaver(model_dir=run.model_dir, all_users=True, k=4,
                           index="brute_force"), \
      contextlib.redirect_stdout(out):
    assert recommend_command.main(["recommend"]) == 0
  summary = json.loads(out.getvalue())
  default = os.path.join(run.model_dir, "recommendations.parquet")
  assert summary["path"] == default and summary["users"] == len(users)
  assert pq.read_metadata(default).num_rows == 4 * len(users)
  os.remove(default)
  ids = tmp_path / "ids.txt"
  ids.write_text("\n".join(users[:3]) + "\n")
  output = str(tmp_path / "three.parquet")
  with flagsaver.flagsaver(model_dir=run.model_dir, users_file=str(ids),
                           output=output, k=2, index="brute_force",
                           batch_users=2), \
      contextlib.redirect_stdout(io.StringIO()):
    assert recommend_command.main(["recommend"]) == 0
  assert pq.read_metadata(output).num_row_groups == 2
  err = io.StringIO()
  with flagsaver.flagsaver(model_dir=run.model_dir, users_file=str(ids),
                           all_users=True), contextlib.redirect_stderr(err):
    assert recommend_command.main(["recommend"]) == 1
  assert "not both" in err.getvalue()
  with flagsaver.flagsaver(model_dir=run.model_dir, all_users=True,
                           user_id=users[0], index="brute_force"), \
      contextlib.redirect_stderr(err):
    assert recommend_command.main(["recommend"]) == 1
  assert "for one user" in err.getvalue()
  with flagsaver.flagsaver(model_dir=run.model_dir, index="brute_force",
                           users_file=str(tmp_path / "missing.txt")), \
      contextlib.redirect_stderr(err):
    assert recommend_command.main(["recommend"]) == 1
  assert "missing.txt" in err.getvalue()
