"""`tt-mimic recommend`: top-k books from an exported run.

One user, printed:

  tt-mimic recommend --model_dir=<run> --user_id=<id> \
      [--history=asin1,asin2] [--k=10] [--format=table|json] \
      [--index=scann|brute_force] [--noexclude_seen]

Many users, written to Parquet (userId, rank, parent_asin, score, source;
see `tt_mimic.serving.batch`), in chunks, with progress lines:

  tt-mimic recommend --model_dir=<run> --all_users | --users_file=<ids.txt> \
      [--output=<run>/recommendations.parquet] [--k=10] [--batch_users=1024]
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags

from tt_mimic.commands import common
from tt_mimic.serving import batch
from tt_mimic.serving import recommender as recommend

_USER_ID = flags.DEFINE_string("user_id", None, "User to recommend for.")
_HISTORY = flags.DEFINE_list(
    "history", [], "parent_asins the user read, oldest first (comma "
    "separated); for an unknown user, the basis of the recommendations.")
_FORMAT = flags.DEFINE_enum("format", "table", ["table", "json"],
                            "Output format.")
_EXCLUDE_SEEN = flags.DEFINE_bool("exclude_seen", True,
                                  "Leave out books the user has read.")
_ALL_USERS = flags.DEFINE_bool(
    "all_users", False, "Recommend for every user the export knows and "
    "write them to --output (Parquet) instead of printing.")
_USERS_FILE = flags.DEFINE_string(
    "users_file", None, "A text file of user ids, one per line: recommend "
    "for each and write them to --output (Parquet).")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Parquet file of --all_users/--users_file (default "
    "<model_dir>/recommendations.parquet).")
_BATCH_USERS = flags.DEFINE_integer(
    "batch_users", 1024, "Users asked for and written at once by "
    "--all_users/--users_file.", lower_bound=1)


def _write_batch(recommender, serve) -> int:
  """--all_users / --users_file: writes the Parquet file, prints a summary."""
  if _USER_ID.value or _HISTORY.value:
    print("error: --user_id and --history are for one user; not with "
          "--all_users or --users_file.", file=sys.stderr)
    return 1
  if _ALL_USERS.value:
    users = batch.all_users(recommender)
    total = len(users)
  else:
    users, total = batch.read_user_ids(_USERS_FILE.value), None
  output = _OUTPUT.value or os.path.join(common.MODEL_DIR.value,
                                         "recommendations.parquet")
  summary = batch.write_recommendations(
      recommender, users, output, serve.k, _EXCLUDE_SEEN.value,
      _BATCH_USERS.value, total)
  print(json.dumps({"k": serve.k, "index": serve.index, **summary}))
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  common.note_ignored(decides="The run's export")
  serve = common.serve_config()
  if _ALL_USERS.value and _USERS_FILE.value:
    print("error: give --all_users or --users_file, not both.",
          file=sys.stderr)
    return 1
  try:
    recommender = recommend.Recommender(common.MODEL_DIR.value, serve.index)
    if _ALL_USERS.value or _USERS_FILE.value:
      return _write_batch(recommender, serve)
    recs = recommender.recommend(_USER_ID.value, _HISTORY.value, serve.k,
                                 _EXCLUDE_SEEN.value)
  except (recommend.ExportError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if _FORMAT.value == "json":
    print(json.dumps({"user_id": _USER_ID.value, "k": serve.k,
                      "index": serve.index, **recs.to_json()}, indent=2))
  else:
    print(f"{recs.note} (user {_USER_ID.value or '-'}, {serve.index} index)")
    print(recommend.format_table(recs))
  return 0


def run(argv=None):
  app.run(main, argv=argv)


if __name__ == "__main__":
  run()
