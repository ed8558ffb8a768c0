"""PEFT LoRA adapters: reading and writing them (`adapter`) and PEFT's
names and layouts (`layout`)."""

from longlora_jax.core import lazy as _lazy

__getattr__, __dir__ = _lazy.exports(__name__, {
    "load_peft": "adapter",
    "save_peft": "adapter",
}, submodules=("adapter", "layout"))
