"""Training data: token streams (text files, JSON, Parquet, token files,
packed rows) and SFT conversations."""

from longlora_jax.core import lazy as _lazy

__getattr__, __dir__ = _lazy.exports(__name__, {
}, submodules=("sources", "text", "sft"))
