"""`tt-mimic <command> [flags]`: the console entry point.

Each command is a module of this package with a `run(argv)`; only the
chosen one is imported, so `--help` lists that command's flags alone.
`python -m tt_mimic <command>` is the same.
"""

from __future__ import annotations

import importlib
import sys

from absl import flags

COMMANDS = {
    "train": "ingest, train and compare the variants, export, recommend",
    "ingest": "only the ingest step, with its report",
    "export": "re-export a finished run from its directory",
    "evaluate": "full-corpus metrics of a finished run on a split",
    "recommend": "top-k books for one user from an export",
    "serve": "TF Serving's REST API for an export",
    "catalog": "add new books to an export without retraining",
    "synth": "write a synthetic books.csv / users.csv pair",
}


def usage() -> str:
  lines = ["usage: tt-mimic <command> [--flagfile=FILE] [--flag=value ...]",
           "", "commands:"]
  lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
  lines += ["", "tt-mimic <command> --help lists a command's flags."]
  return "\n".join(lines)


def main(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  name = argv[1]
  if name not in COMMANDS:
    print(f"tt-mimic: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
    sys.exit(2)
  module = importlib.import_module(f"tt_mimic.commands.{name}")
  if name != "synth" and any(a in _HELP for a in argv[2:]):
    print(command_help(name, module))
    sys.exit(0)
  module.run([f"tt-mimic {name}"] + argv[2:])


_HELP = ("-h", "-?", "--help", "--helpshort")


def command_help(name: str, module) -> str:
  """The command's own flags, then the run flags it shares with the others
  (absl's --help would list only the flags of the `__main__` module)."""
  parts = [f"tt-mimic {name}: {COMMANDS[name]}", ""]
  own = flags.FLAGS.module_help(module.__name__).strip()
  if own:
    parts += [own, ""]
  parts += [flags.FLAGS.module_help("tt_mimic.commands.common").strip(), "",
            "--helpfull also lists absl's own flags."]
  return "\n".join(parts)


if __name__ == "__main__":
  main()
