"""Evaluation protocols: passkey retrieval, perplexity over sliding
windows, RULER."""

from longlora_jax.core import lazy as _lazy

__getattr__, __dir__ = _lazy.exports(__name__, {
}, submodules=("passkey", "perplexity", "ruler", "suggest"))
