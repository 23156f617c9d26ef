"""absl flags shared by the entry points, and their conversion to configs.

Only entry points (`train`, `ingest`) import this module; library code
takes the frozen config dataclasses built here.
"""

from __future__ import annotations

from absl import flags

import tt_mimic  # noqa: F401

# data
BOOKS_CSV = flags.DEFINE_string("books_csv", "data/books.csv",
                                "books.csv or books.csv.gz.")
USERS_CSV = flags.DEFINE_string("users_csv", "data/users.csv",
                                "users.csv or users.csv.gz (the events).")
MODEL_DIR = flags.DEFINE_string("model_dir", "saved_models/run",
                                "Run directory: artifacts, logs, exports.")
CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Ingest cache directory (default <model_dir>/ingest).")
SPLIT = flags.DEFINE_enum("split", "leave_last_out",
                          ["leave_last_out", "temporal"], "Evaluation split.")
SPLIT_CUTOFF_MS = flags.DEFINE_integer(
    "split_cutoff_ms", 0, "Temporal split: events at or after it are test "
    "(0 = 90th percentile of event times).", lower_bound=0)
VAL_FRACTION = flags.DEFINE_float(
    "val_fraction", 0.1, "Temporal split: latest share of earlier events "
    "used for validation.", lower_bound=0.0, upper_bound=0.5)
BOOKS_LIMIT = flags.DEFINE_integer("books_limit", 2_000_000,
                                   "First N valid books (0 = all).",
                                   lower_bound=0)
INTERACTIONS_LIMIT = flags.DEFINE_integer(
    "interactions_limit", 200_000, "First N valid events (0 = all).",
    lower_bound=0)
MIN_USER_INTERACTIONS = flags.DEFINE_integer(
    "min_user_interactions", 5, "k-core threshold for users.", lower_bound=1)
MIN_ITEM_INTERACTIONS = flags.DEFINE_integer(
    "min_item_interactions", 10, "k-core threshold for books.", lower_bound=1)
SEED = flags.DEFINE_integer("seed", 42, "Random seed.")


def ingest_config():
  from tt_mimic import ingest  # pylint: disable=g-import-not-at-top
  return ingest.IngestConfig(
      books_csv=BOOKS_CSV.value, users_csv=USERS_CSV.value,
      books_limit=BOOKS_LIMIT.value,
      interactions_limit=INTERACTIONS_LIMIT.value,
      min_user_interactions=MIN_USER_INTERACTIONS.value,
      min_item_interactions=MIN_ITEM_INTERACTIONS.value,
      split=SPLIT.value, split_cutoff_ms=SPLIT_CUTOFF_MS.value,
      val_fraction=VAL_FRACTION.value)

# export
EXPORT_K = flags.DEFINE_integer("export_k", 100, "Results per query of the "
                                "exported indexes.", lower_bound=1)
MAX_EXCLUSIONS = flags.DEFINE_integer(
    "max_exclusions", 100, "Extra results retrieved so that excluded books "
    "can be dropped.", lower_bound=0)
SCANN_NUM_LEAVES = flags.DEFINE_integer(
    "scann_num_leaves", 0, "ScaNN leaves (0 = from corpus size).",
    lower_bound=0)
SCANN_LEAVES_TO_SEARCH = flags.DEFINE_integer(
    "scann_leaves_to_search", 0, "ScaNN leaves searched (0 = from corpus "
    "size).", lower_bound=0)
SCANN_REORDER = flags.DEFINE_integer(
    "scann_reorder", 0, "ScaNN exact reordering candidates (0 = from corpus "
    "size).", lower_bound=0)


def export_config():
  from tt_mimic import export  # pylint: disable=g-import-not-at-top
  return export.ExportConfig(
      k=EXPORT_K.value, max_exclusions=MAX_EXCLUSIONS.value,
      scann_num_leaves=SCANN_NUM_LEAVES.value,
      scann_leaves_to_search=SCANN_LEAVES_TO_SEARCH.value,
      scann_reorder=SCANN_REORDER.value)
