"""Training data: its sources read and checked at the door (text, JSON,
JSONL, Parquet, token files, directories), token streams and packed rows,
and SFT conversations."""

from longlora_jax.core import lazy as _lazy

__getattr__, __dir__ = _lazy.exports(__name__, {
}, submodules=("sources", "text", "sft"))
