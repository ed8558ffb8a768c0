"""Shared ground: errors that mean "the user can fix this", atomic files
and the run lock, command-line helpers, lazy exports, plots, the cores a
process may use."""

from longlora_jax.core import lazy as _lazy

__getattr__, __dir__ = _lazy.exports(__name__, {}, submodules=(
    "errors", "files", "lock", "cli", "lazy", "plots", "cpus"))
