"""The Llama model used functionally: its config, the Flax modules, RoPE,
LoRA as a parameter-tree transform, the loss, the KV cache, generation and
FLOP counts."""

from longlora_jax.core import lazy as _lazy

__getattr__, __dir__ = _lazy.exports(__name__, {
    "LlamaConfig": "config",
    "preset": "config",
    "init_params": "llama",
    "forward": "llama",
    "hidden_states": "llama",
    "generate": "generation",
    "add_lora": "lora",
    "merge": "lora",
    "trainable_mask": "lora",
}, submodules=("config", "remat", "modules", "by_group", "llama", "rope",
               "lora", "loss", "kv_cache", "generation", "flops", "nf4"))
