"""The package's import graph has no cycle: every explicit import between our modules counts, at module level,
inside functions (lazy) or under `TYPE_CHECKING`. (A package's `__init__` running before its submodules is
Python's doing, not an edge.)"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("flashvl_jax", "convert")


def module_files() -> dict[str, pathlib.Path]:
  files = {}
  for package in PACKAGES:
    for path in (ROOT / package).rglob("*.py"):
      parts = path.relative_to(ROOT).with_suffix("").parts
      files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return files


def imports_of(path: pathlib.Path, modules: set[str]) -> set[str]:
  """Our modules that `path` imports anywhere in its body."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
               for alias in node.names]
    else:
      continue
    found.update(name for name in names if name in modules)
  return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state: dict[str, str] = {}  # "open" while on the DFS stack, then "done"
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def import_graph() -> dict[str, set[str]]:
  files = module_files()
  return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def test_no_import_cycles():
  graph = import_graph()
  assert sum(map(len, graph.values())) > 100  # the graph was read
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_cycles_between_subpackages():
  """models, weights, preprocess, data, train, ... (and each top-level module) form layers, as
  docs/architecture.md draws them."""
  group = lambda name: ".".join(name.split(".")[:2])
  graph: dict[str, set[str]] = {}
  for name, deps in import_graph().items():
    graph.setdefault(group(name), set()).update(group(d) for d in deps if group(d) != group(name))
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
