"""The package's imports run one way and only commands define flags.

Layers, bottom up: `config` and `progress`; `data` and `model` (independent of each
other); `training`; `serving`; `commands` (and `__main__`). A module may
import its own layer and the layers below it, never above. The imports
are read with `ast` (module level and inside functions), nothing is run.
"""

import ast
import os
import subprocess
import sys

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "tt_mimic")
RANK = {"tt_mimic": 0, "config": 0, "progress": 0, "data": 1, "model": 1, "training": 2,
        "serving": 3, "commands": 4, "__main__": 5}


def _modules() -> dict[str, str]:
  """{dotted module name: path} of every module of the package."""
  out = {}
  for directory, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3]
        module = rel.replace(os.sep, ".").removesuffix(".__init__")
        out[module] = path
  return out


def _imports(path: str, module: str, known) -> tuple[set, bool, list]:
  """(package modules imported, whether absl.flags is imported, the package
  imports made inside functions) of one file."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  top = {id(node) for node in tree.body}
  edges, flags, nested = set(), False, []
  is_package = path.endswith("__init__.py")
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([base] if base else []))
      names = [base] + [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    if "absl.flags" in names:
      flags = True
    hit = {n for n in names if n in known and n != module}
    if hit and id(node) not in top:
      nested.append((module, node.lineno))
    edges |= hit
  return edges, flags, nested


def _layer(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else parts[0]


def _graph():
  modules = _modules()
  graph, flag_users, nested = {}, [], []
  for module, path in modules.items():
    edges, flags, inner = _imports(path, module, modules)
    graph[module] = edges
    nested += inner
    if flags:
      flag_users.append(module)
  return graph, flag_users, nested


def _cycle(graph) -> list[str] | None:
  """One import cycle, or None (depth-first search with colours)."""
  state, stack = {}, []

  def visit(v):
    state[v] = "open"
    stack.append(v)
    for w in sorted(graph[v]):
      if state.get(w) == "open":
        return stack[stack.index(w):] + [w]
      if w not in state:
        found = visit(w)
        if found:
          return found
    stack.pop()
    state[v] = "done"
    return None

  for v in sorted(graph):
    if v not in state:
      found = visit(v)
      if found:
        return found
  return None


def test_no_import_cycle():
  graph, _, _ = _graph()
  assert _cycle(graph) is None


def test_cycle_finder_finds_a_planted_cycle():
  # The check above must be able to fail.
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
  assert _cycle(graph) == ["a", "b", "c", "a"]


def test_only_commands_import_absl_flags():
  _, flag_users, _ = _graph()
  assert flag_users, "the commands define flags"
  assert [m for m in flag_users if _layer(m) != "commands"] == []


def test_no_function_level_imports_of_the_package():
  _, _, nested = _graph()
  assert nested == []


def test_imports_run_one_way():
  graph, _, _ = _graph()
  wrong = []
  for module, edges in graph.items():
    for target in edges:
      a, b = _layer(module), _layer(target)
      if RANK[b] > RANK[a] or (a != b and {a, b} == {"data", "model"}):
        wrong.append(f"{module} -> {target}")
  assert wrong == []


def test_library_import_registers_no_flag():
  # A user's own absl program can import the Python API without clashes.
  library = sorted(m for m in _modules()
                   if _layer(m) not in ("commands", "__main__"))
  code = "\n".join(
      [f"import {m}" for m in library]
      + ["from absl import flags",
         "print([m for m in flags.FLAGS.flags_by_module_dict() "
         "if m.startswith('tt_mimic')])",
         "flags.DEFINE_string('model_dir', '', '')",
         "flags.DEFINE_integer('seed', 0, '')",
         "flags.DEFINE_integer('k', 0, '')"])
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1] == "[]"
