"""`python -m tt_mimic.commands.run_dir FLAGFILE`: the run directory a
flagfile names.

Prints the last `--model_dir` of FLAGFILE, nested flagfiles expanded as
absl expands them for a command, or `--model_dir`'s default when it names
none. The Makefile's MODEL_DIR defaults to it, so `make train
FLAGFILE=flags/full.cfg` and a later `make recommend FLAGFILE=flags/full.cfg`
use the flagfile's run directory.
"""

from __future__ import annotations

import sys

from absl import flags

from tt_mimic.commands import common

_PREFIX = "--model_dir="


def model_dir(flagfile: str) -> str:
  """The run directory `flagfile` names.

  Raises:
    flags.Error: a flagfile cannot be read (absl's CantOpenFlagFileError).
  """
  args = flags.FLAGS.read_flags_from_files([f"--flagfile={flagfile}"],
                                          force_gnu=False)
  given = [a[len(_PREFIX):] for a in args if a.startswith(_PREFIX)]
  return given[-1] if given else common.MODEL_DIR.default


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print(f"usage: python -m {__spec__.name} FLAGFILE", file=sys.stderr)
    return 2
  try:
    print(model_dir(argv[1]))
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
