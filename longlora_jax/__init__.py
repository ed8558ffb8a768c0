"""longlora_jax: LongLoRA context extension of Llama-2 in JAX/Flax."""

from longlora_jax.attention import ATTENTION_FNS, causal_attention, get_attention
from longlora_jax.config import PRESETS, LlamaConfig, RopeScaling, preset
from longlora_jax.errors import CheckpointError, LongLoraError
from longlora_jax.hf_io import load_hf, resolve_checkpoint, save_hf
from longlora_jax.model import (REMAT_POLICIES, forward, hidden_states,
                                init_params, lm_head)
from longlora_jax.rope import apply_rope

__all__ = [
    "ATTENTION_FNS", "CheckpointError", "LlamaConfig", "LongLoraError",
    "PRESETS", "REMAT_POLICIES", "RopeScaling", "apply_rope",
    "causal_attention", "forward", "get_attention", "hidden_states",
    "init_params", "lm_head", "load_hf", "preset", "resolve_checkpoint",
    "save_hf",
]
