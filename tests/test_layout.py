"""The shape of the code: imports form a DAG, every attention module imports
on its own, commands stand alone, library tests stay off the commands."""

import ast
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "longlora_jax"
PACKAGES = sorted(_p.parent.relative_to(ROOT).as_posix().replace("/", ".")
                  for _p in PACKAGE.rglob("__init__.py"))
ATTENTION = sorted(
    p.relative_to(PACKAGE / "attention").with_suffix("").as_posix().replace(
        "/", ".") for p in (PACKAGE / "attention").rglob("*.py")
    if p.stem != "__init__")


def _module_name(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
  """Modules `path` imports (`from a import b` counts a.b when it is a
  module), at module level or anywhere."""
  tree = ast.parse(path.read_text())
  nodes = tree.body if top_level_only else list(ast.walk(tree))
  found = set()
  for node in nodes:
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      found.add(node.module)
      found.update(f"{node.module}.{a.name}" for a in node.names)
  return found


def _library_graph(top_level_only: bool) -> dict[str, set[str]]:
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  return {name: {m for m in _imports(path, top_level_only=top_level_only)
                 if m in modules and m != name}
          for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_library_imports_form_a_dag():
  # Module-level imports decide whether an order of imports can fail; the
  # imports inside functions (lazy, for optional or heavy dependencies) are
  # checked too, apart from the lazy package exports (`_lazy`).
  assert _cycle(_library_graph(top_level_only=True)) is None
  everywhere = _library_graph(top_level_only=False)
  for package in ("longlora_jax", "longlora_jax.attention", "longlora_jax.checkpoints",
                  "longlora_jax.training"):
    everywhere[package] = set()  # __init__: lazy name -> module table only
  assert _cycle(everywhere) is None


def test_attention_package_is_layered():
  # Leaves import no other attention module; dispatch is the only module
  # that imports the implementations it chooses between.
  graph = _library_graph(top_level_only=False)
  prefix = "longlora_jax.attention."
  inside = lambda m: {d[len(prefix):] for d in graph[prefix + m]
                      if d[len(prefix):] in ATTENTION}
  assert inside("masks") == inside("groups") == inside("heads") == set()
  assert inside("dense") == inside("chunked") == {"masks"}
  assert inside("cached") == {"masks"}
  assert inside("pallas.blocks") == set()
  assert inside("local") == {"dense", "chunked"}
  assert inside("pallas.flash") == {"pallas.blocks"}
  assert inside("s2") == {"dense", "chunked", "groups", "heads"}
  assert inside("pallas.grouped") == {"groups", "pallas.blocks",
                                      "pallas.flash"}
  assert inside("pallas.cached") == {"pallas.blocks", "pallas.flash"}
  assert inside("cudnn_grouped") == {"groups", "heads"}
  assert inside("by_group") == {"groups"}
  assert inside("context") == {"chunked", "groups", "heads", "pallas.grouped"}
  assert not any("dispatch" in inside(m) for m in ATTENTION)


def test_every_attention_module_imports_first_and_alone():
  # Each module first, then the rest in reverse order (with the DAG above,
  # no order can fail), each time with none of the package imported yet:
  # one fresh interpreter that forgets the package between the orders
  # (JAX itself stays loaded; it is not what is tested).
  orders = [[f"longlora_jax.attention.{m}" for m in
             (first, *[m for m in reversed(ATTENTION) if m != first])]
            for first in ATTENTION]
  code = (
      "import importlib, sys\n"
      f"for order in {orders!r}:\n"
      "  for name in [n for n in sys.modules if n.startswith('longlora_jax')]:\n"
      "    del sys.modules[name]\n"
      "  for name in order:\n"
      "    try:\n"
      "      importlib.import_module(name)\n"
      "    except Exception:\n"
      "      print('first:', order[0], file=sys.stderr)\n"
      "      raise\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]


def test_importing_the_package_loads_no_framework():
  code = ("import sys, longlora_jax, longlora_jax.attention, "
          "longlora_jax.training, longlora_jax.checkpoints; "
          "print(sorted(m for m in ('jax', 'optax', 'orbax', 'flax', "
          "'transformers') if m in sys.modules))")
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"


def _commands() -> dict[str, Path]:
  return {_module_name(p): p for d in ("train", "eval", "bench")
          for p in (ROOT / d).glob("*.py")
          if "__main__" in p.read_text()}


def test_no_command_imports_another_command():
  commands = _commands()
  assert {"train.extend", "train.sft", "eval.passkey"} <= set(commands)
  for name, path in commands.items():
    imported = _imports(path, top_level_only=False) & set(commands)
    assert not imported - {name}, (name, imported)


@pytest.mark.parametrize("folder", sorted({
    p.parent.relative_to(ROOT / "tests").as_posix()
    for p in (ROOT / "tests").rglob("test_*.py")
    if p.parent.name not in ("commands", "bench")}))
def test_library_tests_do_not_import_commands(folder):
  tests = [p for p in (ROOT / "tests" / folder).glob("*.py")]
  assert tests
  for path in tests:
    bad = {m for m in _imports(path, top_level_only=False)
           if m.split(".")[0] in ("train", "eval", "bench")}
    assert not bad, (path.name, bad)


def test_no_file_is_long():
  sources = itertools.chain(*((ROOT / d).rglob("*.py") for d in (
      "longlora_jax", "train", "eval", "bench", "tests")))
  long = {str(p.relative_to(ROOT)): n for p in sources
          if (n := len(p.read_text().splitlines())) > 420}
  assert not long


# The layers, lowest first: a library module imports only modules of its own
# package or of packages on earlier layers (two packages on one layer import
# neither each other). docs/architecture.md shows the same list.
LAYERS = (("core",), ("parallel",), ("attention",), ("model",), ("perf",),
          ("checkpoints",), ("data",), ("training", "evaluation"), ("demo",))
COMMAND_FOLDERS = ("train", "eval", "bench")


def _package(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if parts[0] == "longlora_jax" and len(parts) > 1 else None


def _layer(package: str) -> int:
  (index,) = [i for i, layer in enumerate(LAYERS) if package in layer]
  return index


def test_every_subpackage_has_a_layer():
  subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
  assert subpackages == {p for layer in LAYERS for p in layer}


def test_imports_flow_down_the_layers():
  wrong = []
  for importer, imported in _library_graph(top_level_only=False).items():
    if importer == "longlora_jax":
      continue  # the package's face: a lazy name -> module table
    for target in imported:
      a, b = _package(importer), _package(target)
      if b is None or a == b:
        continue
      if not _layer(b) < _layer(a):
        wrong.append(f"{importer} -> {target}")
  assert not wrong


def test_the_library_imports_no_command_and_no_test():
  for path in PACKAGE.rglob("*.py"):
    bad = {m for m in _imports(path, top_level_only=False)
           if m.split(".")[0] in (*COMMAND_FOLDERS, "tests")}
    assert not bad, (path.relative_to(ROOT), bad)


def test_the_training_engine_prints_no_evaluation_command():
  for path in (PACKAGE / "training").rglob("*.py"):
    assert "python -m eval." not in path.read_text(), path.name


def test_architecture_doc_lists_the_same_layers():
  text = (ROOT / "docs" / "architecture.md").read_text()
  (block,) = re.findall(r"^```layers\n(.*?)^```", text, re.S | re.M)
  documented = [tuple(p.strip() for p in line.split(":")[0].split("|"))
                for line in block.strip().splitlines()]
  assert documented == [*LAYERS, ("commands",)]
