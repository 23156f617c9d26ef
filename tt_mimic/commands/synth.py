"""`tt-mimic synth`: writes the synthetic books.csv / users.csv pair.

  tt-mimic synth --out_dir=data [--num_books=4000 --num_users=3000
      --num_events=80000 --seed=42 --gzip]

`make sample` regenerates the embedded sample in data/ byte for byte.
"""

from __future__ import annotations

import json
import sys

from absl import app
from absl import flags
from absl import logging

from tt_mimic.data import synth


# The flags live in their own registry, so importing this module next to the
# entry points (which define --seed and more in absl's global FLAGS) cannot
# clash; `_parse_flags` reads them from the command line first.
_FLAGS = flags.FlagValues()
_DEFAULTS = synth.SynthConfig()
_OUT_DIR = flags.DEFINE_string("out_dir", "data", "Output directory.",
                               flag_values=_FLAGS)
_NUM_BOOKS = flags.DEFINE_integer("num_books", _DEFAULTS.num_books,
                                  "Number of books.", flag_values=_FLAGS)
_NUM_USERS = flags.DEFINE_integer("num_users", _DEFAULTS.num_users,
                                  "Number of users.", flag_values=_FLAGS)
_NUM_EVENTS = flags.DEFINE_integer(
    "num_events", _DEFAULTS.num_events,
    "Approximate number of events before dirt.", flag_values=_FLAGS)
_SEED = flags.DEFINE_integer("seed", _DEFAULTS.seed, "Random seed.",
                             flag_values=_FLAGS)
_GZIP = flags.DEFINE_bool("gzip", False,
                          "Write books.csv.gz and users.csv.gz instead.",
                          flag_values=_FLAGS)
_DIRT = flags.DEFINE_bool("dirt", True,
                          "Add the dirt of real dumps (--nodirt: clean data).",
                          flag_values=_FLAGS)
_HELP_ARGS = ("-h", "-?", "--help", "--helpshort", "--helpfull")


def _parse_flags(argv: list[str]) -> list[str]:
  """Parses this module's flags, then absl's own (logging, help) from the rest.

  Unknown flags are reported by absl's global parser.
  """
  try:
    rest = _FLAGS(argv, known_only=True)
  except flags.Error as e:
    sys.exit(f"FATAL Flags parsing error: {e}")
  if any(arg in _HELP_ARGS for arg in rest[1:]):
    print(f"Flags of tt-mimic synth:\n{_FLAGS.get_help()}\n")
  return app.parse_flags_with_usage(rest)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = synth.SynthConfig(num_books=_NUM_BOOKS.value, num_users=_NUM_USERS.value,
                       num_events=_NUM_EVENTS.value, seed=_SEED.value,
                       dirt=_DIRT.value)
  suffix = ".csv.gz" if _GZIP.value else ".csv"
  counts = synth.generate(_OUT_DIR.value, config, books_name="books" + suffix,
                    users_name="users" + suffix)
  logging.info("Counts: %s", json.dumps(counts))


def run(argv=None):
  app.run(main, argv=argv, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
