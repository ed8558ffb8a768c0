"""The built-in demo: its data (the Python standard library) and its
report. Its base model is the built-in checkpoint `demo`."""

from longlora_jax.core import lazy as _lazy

__getattr__, __dir__ = _lazy.exports(__name__, {
}, submodules=("base", "report"))
