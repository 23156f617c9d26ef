"""`tt-mimic recommend`: top-k books for one user from an exported run.

  tt-mimic recommend --model_dir=<run> --user_id=<id> \
      [--history=asin1,asin2] [--k=10] [--format=table|json] \
      [--index=scann|brute_force] [--noexclude_seen]
"""

from __future__ import annotations

import json
import sys

from absl import app
from absl import flags

from tt_mimic.commands import common
from tt_mimic.serving import recommender as recommend

_USER_ID = flags.DEFINE_string("user_id", None, "User to recommend for.")
_HISTORY = flags.DEFINE_list(
    "history", [], "parent_asins the user read, oldest first (comma "
    "separated); for an unknown user, the basis of the recommendations.")
_FORMAT = flags.DEFINE_enum("format", "table", ["table", "json"],
                            "Output format.")
_EXCLUDE_SEEN = flags.DEFINE_bool("exclude_seen", True,
                                  "Leave out books the user has read.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  serve = common.serve_config()
  try:
    recommender = recommend.Recommender(common.MODEL_DIR.value, serve.index)
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
