"""The attention interface the model calls, and plain causal attention.

An attention function maps `q: [batch, seq, q_heads, head_dim]`,
`k, v: [batch, seq, kv_heads, head_dim]` (RoPE already applied) and optional
`segment_ids: [batch, seq]` to `[batch, seq, q_heads, head_dim]`. It applies
the 1/sqrt(head_dim) scale itself and is causal. The model selects one by name
through `get_attention`, or takes any callable with that signature.
"""

from typing import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]


def causal_attention(q_BTNH, k_BSKH, v_BSKH, *, segment_ids_BT=None):
  """Dense causal softmax attention: the XLA reference ("full").

  Grouped-query attention by reshaping the query heads into
  `[kv_heads, group]`, so K/V are read once per kv head and never repeated.
  Scores and softmax in float32. Memory is O(seq^2): use it for short
  sequences and as the reference for the memory-efficient paths.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  scores_BKGTS = jnp.einsum(
      "BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH,
      preferred_element_type=jnp.float32) * (H ** -0.5)
  mask_BTS = causal_mask(T, segment_ids_BT)
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS,
                           jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(B, T, N, H)


def causal_mask(seq_len: int, segment_ids_BT=None):
  """`[batch or 1, seq, seq]` bool: query t may attend key s."""
  t = jnp.arange(seq_len)
  mask_BTS = (t[:, None] >= t[None, :])[None]
  if segment_ids_BT is not None:
    same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    mask_BTS = mask_BTS & same_BTS
  return mask_BTS


ATTENTION_FNS: dict[str, AttentionFn] = {
    "full": causal_attention,
}


def get_attention(attention: str | AttentionFn) -> AttentionFn:
  """An attention function by name (see `ATTENTION_FNS`), or the callable."""
  if callable(attention):
    return attention
  if attention not in ATTENTION_FNS:
    raise ValueError(f"unknown attention {attention!r}; choose one of "
                     f"{sorted(ATTENTION_FNS)} or pass a function")
  return ATTENTION_FNS[attention]
