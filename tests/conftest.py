"""Fixtures shared by every test directory: the tiny datasets.

The generator itself is `tiny_data.write_dataset` (tests/tiny_data.py, which
any test module can import as `tiny_data`). `dataset_writer` binds it to a
fresh sub-directory of the test's `tmp_path` per call; `tiny_dataset` is
one default ("tiny") dataset.

The tests mirror the package: tests/<layer>/test_<module>.py tests
tt_mimic/<layer>/<module>.py (tests/benchmarks: benchmarks/). Test module
basenames are unique across the directories, which have no __init__.py
(pytest's default "prepend" import mode puts tests/ on sys.path, so every
test can `import tiny_data`, `import tiny_model`).
"""

from __future__ import annotations

import pytest

import tiny_data


@pytest.fixture
def dataset_writer(tmp_path):
  """`tiny_data.write_dataset` writing into a fresh directory per call."""
  counter = [0]

  def write(**kwargs) -> tiny_data.TinyDataset:
    counter[0] += 1
    directory = tmp_path / f"dataset{counter[0]}"
    directory.mkdir()
    return tiny_data.write_dataset(directory, **kwargs)

  return write


@pytest.fixture
def tiny_dataset(dataset_writer) -> tiny_data.TinyDataset:
  """The default tiny dataset (12 users x 5 of 10 books, distinct times)."""
  return dataset_writer()


def pytest_collection_modifyitems(config, items):
  """Drops tf.test.TestCase's inherited `test_session` (a helper, not a test)."""
  del config
  items[:] = [item for item in items if item.name != "test_session"]
