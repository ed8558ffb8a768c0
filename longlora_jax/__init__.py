"""longlora_jax: LongLoRA context extension of Llama-2 in JAX/Flax."""

# attention first: the chunked and S² modules build on it.
from longlora_jax.attention import (ATTENTION_FNS, attention_flops,
                                    causal_attention, get_attention)
from longlora_jax.chunked_attention import chunked_causal_attention
from longlora_jax.s2_attention import s2_attention, s2_group_size
from longlora_jax.pallas_s2 import (BlockConfig, pallas_causal_attention,
                                    pallas_s2_attention)
from longlora_jax import lora
from longlora_jax.config import PRESETS, LlamaConfig, RopeScaling, preset
from longlora_jax.errors import CheckpointError, LongLoraError
from longlora_jax.generate import generate
from longlora_jax.hf_io import load_hf, resolve_checkpoint, save_hf
from longlora_jax.lora import add_lora, merge, trainable_mask
from longlora_jax.model import (REMAT_POLICIES, extend_cache, forward,
                                hidden_states, init_params, lm_head)
from longlora_jax.peft_io import load_peft, save_peft
from longlora_jax.rope import apply_rope
from longlora_jax.sharding import make_mesh
from longlora_jax.train_step import (TrainConfig, TrainState, init_state,
                                     jit_train_step, params_of)
from longlora_jax import checkpoint, data, passkey, perplexity, sft

__all__ = [
    "ATTENTION_FNS", "BlockConfig", "CheckpointError", "LlamaConfig", "LongLoraError",
    "PRESETS", "REMAT_POLICIES", "RopeScaling", "add_lora", "apply_rope",
    "attention_flops", "causal_attention", "chunked_causal_attention",
    "extend_cache", "forward", "generate", "get_attention", "hidden_states",
    "init_params", "lm_head", "load_hf", "load_peft", "lora", "merge",
    "pallas_causal_attention", "pallas_s2_attention",
    "preset", "resolve_checkpoint", "s2_attention", "s2_group_size",
    "save_hf", "save_peft", "trainable_mask", "make_mesh", "TrainConfig",
    "TrainState", "init_state", "jit_train_step", "params_of", "checkpoint",
    "data", "passkey", "perplexity", "sft",
]
