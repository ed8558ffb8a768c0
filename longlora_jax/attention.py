"""The attention interface the model calls, and plain causal attention.

An attention function maps `q: [batch, seq, q_heads, head_dim]`,
`k, v: [batch, seq, kv_heads, head_dim]` (RoPE already applied) and optional
`segment_ids_BT: [batch, seq]` to `[batch, seq, q_heads, head_dim]`. It
applies the 1/sqrt(head_dim) scale itself and is causal. The model selects one
by name through `get_attention`, or takes any callable with that signature,
e.g. `functools.partial(s2_attention, variant="roll", group_size=2048)`.

  "full"     dense causal attention (this module), O(seq^2) memory
  "chunked"  flash-style attention in pure JAX (`chunked_attention`), O(seq)
  "s2"       shifted sparse attention, LongLoRA's S²-Attn (`s2_attention`)
  "pallas"   fused causal flash attention for GPUs (`pallas_s2`)
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
  return attention_mask(t, t, segment_ids_BT, segment_ids_BT)


def attention_mask(q_pos_T, k_pos_S, q_segment_ids_BT=None,
                   k_segment_ids_BS=None):
  """`[batch or 1, T, S]` bool: a query may attend a key at or before it in
  its own segment. The one definition of visibility every attention uses."""
  mask_BTS = (q_pos_T[:, None] >= k_pos_S[None, :])[None]
  if q_segment_ids_BT is not None:
    mask_BTS = mask_BTS & (q_segment_ids_BT[:, :, None]
                           == k_segment_ids_BS[:, None, :])
  return mask_BTS


def attention_flops(seq: int, num_heads: int, head_dim: int, *,
                    batch: int = 1, group_size: int | None = None,
                    variant: str = "flash", backward: bool = False) -> float:
  """Matmul FLOPs of causal attention over `batch` sequences of `seq` tokens.

  Convention: a [m, k] x [k, n] product costs 2mkn, and only the (query, key)
  pairs the mask keeps count, so QK^T and PV cost 2 * head_dim each per pair
  and head. Causal attention keeps seq * (seq + 1) / 2 pairs, about half the
  square; S²-Attn (`group_size` set) keeps the causal pairs inside its groups
  (`variant` as in `s2_attention`). `backward=True` returns forward plus
  backward, whose four products (dV, dP, dQ, dK) cost twice the forward; the
  recomputation of the scores in flash-style backwards is not counted, as MFU
  is usually reported.
  """
  if group_size is None:
    pairs = num_heads * seq * (seq + 1) // 2
  else:
    unshifted, shifted = s2_attended_pairs(seq, num_heads, group_size, variant)
    pairs = num_heads // 2 * (unshifted + shifted)
  forward = 4.0 * head_dim * pairs * batch
  return 3 * forward if backward else forward


# These modules build on causal_attention and attention_mask above, so
# they are imported once those exist; this module must load before them
# (longlora_jax/__init__.py imports it first).
from longlora_jax.chunked_attention import chunked_causal_attention  # noqa: E402
from longlora_jax.s2_attention import s2_attended_pairs, s2_attention  # noqa: E402
from longlora_jax.pallas_s2 import pallas_causal_attention  # noqa: E402

# Training uses S²-Attn; evaluation and generation use full attention.
ATTENTION_FNS: dict[str, AttentionFn] = {
    "full": causal_attention,
    "chunked": chunked_causal_attention,
    "s2": s2_attention,
    "pallas": pallas_causal_attention,  # fused kernel, GPU (Triton)
}


def get_attention(attention: str | AttentionFn) -> AttentionFn:
  """An attention function by name (see `ATTENTION_FNS`), or the callable."""
  if callable(attention):
    return attention
  if attention not in ATTENTION_FNS:
    raise ValueError(f"unknown attention {attention!r}; choose one of "
                     f"{sorted(ATTENTION_FNS)} or pass a function")
  return ATTENTION_FNS[attention]
