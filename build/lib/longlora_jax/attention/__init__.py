"""Attention: causal (dense, chunked), S²-Attn (reshape/roll, fused Pallas
kernel) and the dispatch between them.

Modules, each importing only those above it:

  masks, groups          visibility; S² group arithmetic (plain Python)
  heads                  S²'s two halves of the query heads
  dense, chunked         causal attention, dense and flash-style
  pallas_kernels         the fused kernels' bodies and block arithmetic
  s2, pallas_s2,         S²-Attn by reshape/roll; the fused Pallas kernels;
  cudnn_s2               grouped cuDNN flash attention
  context                S²-Attn and causal attention over a sequence split
                         across devices (context parallelism)
  dispatch               names, `AttentionSpec`, "auto"
"""

from longlora_jax.core import lazy as _lazy

__getattr__, __dir__ = _lazy.exports(__name__, {
    "AttentionFn": "dispatch",
    "AttentionSpec": "dispatch",
    "ATTENTION_FNS": "dispatch",
    "get_attention": "dispatch",
    "s2_attention": "dispatch",
    "full_attention": "dispatch",
    "fused_for": "dispatch",
    "causal_attention": "dense",
    "chunked_causal_attention": "chunked",
    "pallas_s2_attention": "pallas_s2",
    "pallas_causal_attention": "pallas_s2",
    "cudnn_s2_attention": "cudnn_s2",
    "s2_group_size": "groups",
    "VARIANTS": "groups",
}, submodules=("masks", "groups", "heads", "dense", "chunked",
               "pallas_kernels", "s2", "pallas_s2", "cudnn_s2", "context",
               "dispatch"))
