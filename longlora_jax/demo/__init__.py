"""The built-in demo: its base model's config and tokenizer (`base`), its
data (`stdlib`, the Python standard library), the defaults that make it
`python -m train.extend`'s run with no arguments (`defaults`) and its
report (`report`). Its base model is the built-in checkpoint `demo`."""

from longlora_jax.core import lazy as _lazy

__getattr__, __dir__ = _lazy.exports(__name__, {
}, submodules=("base", "stdlib", "defaults", "report"))
