"""RULER-style long-context evaluation: the suite, its synthetic tasks
and their sources."""

from longlora_jax.core import lazy as _lazy

__getattr__, __dir__ = _lazy.exports(__name__, {
}, submodules=("suite", "tasks", "sources"))
