"""Dense causal attention ("dense"): the whole score matrix at once."""

import jax
import jax.numpy as jnp

from longlora_jax.attention.masks import causal_mask, soft_cap


def dense_causal_attention(q_BTNH, k_BSKH, v_BSKH, *, segment_ids_BT=None,
                           window: int | None = None,
                           softcap: float | None = None):
  """Dense causal softmax attention with the attention signature.

  Grouped-query attention by reshaping the query heads into `[kv_heads,
  Q]` (Q = q_heads / kv_heads), so K/V are read once per kv head and never
  repeated. Scores and softmax in float32. Memory is O(seq^2): use it for
  short sequences and as the reference for the memory-efficient paths.
  `window`: a sliding window (`masks.attention_mask`), None for none.
  `softcap`: scores soft-capped, cap * tanh(s / cap), before the mask
  (Gemma 2's attention logit soft-capping).
  """
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKQH = q_BTNH.reshape(B, T, K, N // K, H)
  scores_BKQTS = jnp.einsum(
      "BTKQH,BSKH->BKQTS", q_BTKQH, k_BSKH,
      preferred_element_type=jnp.float32) * (H ** -0.5)
  scores_BKQTS = soft_cap(scores_BKQTS, softcap)
  mask_BTS = causal_mask(T, segment_ids_BT, window)
  scores_BKQTS = jnp.where(mask_BTS[:, None, None], scores_BKQTS,
                           jnp.finfo(jnp.float32).min)
  probs_BKQTS = jax.nn.softmax(scores_BKQTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKQH = jnp.einsum("BKQTS,BSKH->BTKQH", probs_BKQTS, v_BSKH)
  return out_BTKQH.reshape(B, T, N, H)
