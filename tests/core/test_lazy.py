"""Lazy package exports: a public name is one object, whatever was imported
before it (no name that flips between a function and a module)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from longlora_jax.core import lazy

ROOT = Path(__file__).resolve().parents[2]


def test_a_name_loads_from_its_module_on_first_use():
  getattr_, dir_ = lazy.exports("json", {"JSONDecoder": "decoder"},
                                submodules=("scanner",))
  import json.decoder
  import json.scanner
  assert getattr_("JSONDecoder") is json.decoder.JSONDecoder
  assert getattr_("scanner") is json.scanner
  assert dir_() == ["JSONDecoder", "scanner"]
  with pytest.raises(AttributeError, match="no attribute 'dumps'"):
    getattr_("dumps")


# In one fresh interpreter: every public name of every package, then every
# module of the library imported, then the names again. Importing a module
# binds it as an attribute of its package, which outranks the package's lazy
# __getattr__: a public name spelled like a module of its package would turn
# from the function into the module (`ll.generate(...)`: "'module' object is
# not callable").
_CHECK = textwrap.dedent("""
    import importlib, pkgutil, sys
    import longlora_jax
    packages = ["longlora_jax"] + sorted(
        m.name for m in pkgutil.walk_packages(longlora_jax.__path__,
                                              "longlora_jax.") if m.ispkg)
    def names():
      out = {}
      for p in packages:
        package = importlib.import_module(p)
        for name in dir(package):
          if not name.startswith("_"):
            out[f"{p}.{name}"] = getattr(package, name)
      return out
    before = names()
    for m in pkgutil.walk_packages(longlora_jax.__path__, "longlora_jax."):
      importlib.import_module(m.name)
    after = names()
    flipped = sorted(n for n in before if after[n] is not before[n])
    print(len(before), flipped)
""")


def test_no_public_name_changes_meaning_when_modules_are_imported():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  out = subprocess.run([sys.executable, "-c", _CHECK], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  count, flipped = out.stdout.split(" ", 1)
  assert int(count) > 50  # the walk saw the packages' names
  assert flipped.strip() == "[]"
