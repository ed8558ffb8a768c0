"""longlora_jax: LongLoRA context extension of Llama models in JAX/Flax.

The names below load lazily; the rest lives in the subpackages
`longlora_jax.attention` (S²-Attn and causal attention), `longlora_jax.checkpoints`
(checkpoints, adapters, files) and `longlora_jax.training` (the engine).
"""

import os as _os

from longlora_jax.core import lazy as _lazy

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
    "LlamaConfig": "model.config",
    "preset": "model.config",
    "init_params": "model.llama",
    "forward": "model.llama",
    "hidden_states": "model.llama",
    "generate": "model.generation",
    # LoRA
    "add_lora": "model.lora",
    "merge": "model.lora",
    "trainable_mask": "model.lora",
    # attention
    "AttentionSpec": "attention.dispatch",
    "get_attention": "attention.dispatch",
    "s2_attention": "attention.dispatch",
    # checkpoints
    "Checkpoint": "checkpoints.checkpoint",
    "load_hf": "checkpoints.checkpoint",
    "save_hf": "checkpoints.hf",
    "load_peft": "checkpoints.peft.adapter",
    "save_peft": "checkpoints.peft.adapter",
    # training
    "TrainConfig": "training.recipe",
    "RunSpec": "training.recipe",
    "TrainState": "training.step",
    "initial_state": "training.step",
    "jit_train_step": "training.step",
    "make_mesh": "parallel.sharding",
    # errors
    "LongLoraError": "core.errors",
    "CheckpointError": "core.errors",
}, submodules=("core", "parallel", "attention", "model", "checkpoints", "data",
               "training", "evaluation", "perf", "demo"))
