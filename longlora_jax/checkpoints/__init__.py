"""Reading and writing models: where a checkpoint lives (a directory, the
Hugging Face cache, a built-in one), safetensors weights read shard by
shard, the Hugging Face format (`Checkpoint`, `load_hf`, `save_hf`) and PEFT
adapters."""

from longlora_jax.core import lazy as _lazy

__getattr__, __dir__ = _lazy.exports(__name__, {
    "Checkpoint": "checkpoint",
    "load_hf": "checkpoint",
    "save_hf": "hf",
    "resolve_checkpoint": "hub",
    "load_peft": "peft.adapter",
    "save_peft": "peft.adapter",
}, submodules=("bnb", "checkpoint", "hf", "hub", "meta", "peft", "pth",
               "quantized", "tokenizer", "weights"))
