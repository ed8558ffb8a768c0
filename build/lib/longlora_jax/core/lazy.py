"""Lazy package exports: a name is imported from its module on first use.

`import longlora_jax` then costs almost nothing (no orbax, optax or Pallas
until something needs them), and a package's `__init__` never creates an
import cycle between its modules.
"""

import importlib


def exports(package: str, names: dict[str, str],
            submodules: tuple[str, ...] = ()):
  """(`__getattr__`, `__dir__`) for `package`, whose `names` map each public
  name to the module (relative to `package`) that defines it; `submodules`
  are importable as attributes too."""

  def __getattr__(name):
    if name in names:
      value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
    elif name in submodules:
      value = importlib.import_module(f"{package}.{name}")
    else:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return value

  def __dir__():
    return sorted({*names, *submodules})

  return __getattr__, __dir__
