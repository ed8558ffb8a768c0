"""longlora_jax: LongLoRA context extension of Llama models in JAX/Flax.

The names below load lazily; the rest lives in the subpackages
`longlora_jax.attention` (S²-Attn and causal attention), `longlora_jax.io`
(checkpoints, adapters, files) and `longlora_jax.training` (the engine).
"""

import os as _os

from longlora_jax import _lazy

# JAX's CUDA plugin (the test requirements install it for its compiler,
# which needs no GPU) checks the CUDA libraries when JAX starts and logs a
# 20-line "Unable to load cuDNN" traceback where they are absent, then runs
# on the CPU. Where no NVIDIA GPU can be (no driver device), that check has
# nothing to check: skip it. A GPU box keeps it.
if not any(map(_os.path.exists, ("/dev/nvidiactl", "/dev/nvidia0",
                                 "/proc/driver/nvidia", "/dev/dxg"))):
  _os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

__getattr__, __dir__ = _lazy.exports(__name__, {
    # model
    "LlamaConfig": "config",
    "preset": "config",
    "init_params": "model",
    "forward": "model",
    "hidden_states": "model",
    "generate": "generate",
    # checkpoints
    "Checkpoint": "io.checkpoint",
    "load_hf": "io.checkpoint",
    "save_hf": "io.hf",
    "load_peft": "io.peft",
    "save_peft": "io.peft",
    # LoRA
    "add_lora": "lora",
    "merge": "lora",
    "trainable_mask": "lora",
    # attention
    "AttentionSpec": "attention.dispatch",
    "get_attention": "attention.dispatch",
    "s2_attention": "attention.dispatch",
    # training
    "TrainConfig": "training.recipe",
    "RunSpec": "training.recipe",
    "TrainState": "training.step",
    "initial_state": "training.step",
    "jit_train_step": "training.step",
    "make_mesh": "sharding",
    # errors
    "LongLoraError": "errors",
    "CheckpointError": "errors",
}, submodules=("attention", "io", "training", "config", "model", "lora",
               "generate", "kv_cache", "loss", "rope", "sharding", "flops",
               "data", "sft", "passkey", "perplexity", "ruler", "ruler_tasks",
               "demo", "demo_report",
               "distributed", "gpu_target", "plots", "errors", "cli"))
