"""Performance plumbing: compile-only GPU targets, reading compiled HLO,
and the library half of memory planning."""

from longlora_jax.core import lazy as _lazy

__getattr__, __dir__ = _lazy.exports(__name__, {
}, submodules=("gpu_target", "hlo", "memory_search"))
