"""Attention: full attention (causal attention over the whole sequence) and
S²-Attn, each by several implementations, and the dispatch between them.

Modules, each importing only those above it:

  masks, groups          visibility; S² group arithmetic (plain Python)
  heads                  S²'s two halves of the query heads
  dense, chunked         causal attention: the whole score matrix at once;
                         flash-style in pure JAX
  cached                 new tokens over the stacked KV cache (pure JAX)
  pallas.*               the fused Pallas kernels: tiles (`blocks`), bodies
                         (`flash`), grouped causal attention (`grouped`:
                         S²-Attn, full attention, a context window), the
                         cache (`cached`)
  s2, cudnn_grouped      S²-Attn by reshape/roll; grouped causal attention
                         on cuDNN (full attention, S²-Attn)
  by_group               S²-Attn one group at a time: each piece's rows and
                         attention (the model runs the pieces)
  context                S²-Attn and full attention over a sequence split
                         across devices (context parallelism)
  dispatch               names, implementations and "auto", `AttentionSpec`,
                         context forms, the cache's attention
"""

from longlora_jax.core import lazy as _lazy

__getattr__, __dir__ = _lazy.exports(__name__, {
    "AttentionFn": "dispatch",
    "AttentionSpec": "dispatch",
    "ATTENTION_FNS": "dispatch",
    "IMPLEMENTATIONS": "dispatch",
    "get_attention": "dispatch",
    "s2_attention": "dispatch",
    "full_attention": "dispatch",
    "cached_attention": "dispatch",
    "fused_for": "dispatch",
    "dense_causal_attention": "dense",
    "chunked_causal_attention": "chunked",
    "pallas_s2_attention": "pallas.grouped",
    "pallas_causal_attention": "pallas.grouped",
    "cudnn_s2_attention": "cudnn_grouped",
    "cudnn_causal_attention": "cudnn_grouped",
    "s2_group_size": "groups",
    "VARIANTS": "groups",
}, submodules=("masks", "groups", "heads", "dense", "chunked", "cached",
               "pallas", "s2", "cudnn_grouped", "by_group", "context",
               "dispatch"))
