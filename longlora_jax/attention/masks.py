"""Which keys a query may see, and how a soft-capped score is capped: the
one definition every attention uses."""

import jax.numpy as jnp


def attention_mask(q_pos_T, k_pos_S, q_segment_ids_BT=None,
                   k_segment_ids_BS=None, window=None):
  """`[batch or 1, T, S]` bool: a query may attend a key at or before it in
  its own segment, and with a sliding `window`, one of the `window` latest
  (itself included), as transformers' sliding window: q - k < window."""
  mask_BTS = (q_pos_T[:, None] >= k_pos_S[None, :])[None]
  if window is not None:
    mask_BTS = mask_BTS & (q_pos_T[:, None] - k_pos_S[None, :] < window)[None]
  if q_segment_ids_BT is not None:
    mask_BTS = mask_BTS & (q_segment_ids_BT[:, :, None]
                           == k_segment_ids_BS[:, None, :])
  return mask_BTS


def causal_mask(seq_len: int, segment_ids_BT=None, window=None):
  """`[batch or 1, seq, seq]` bool: query t may attend key s."""
  t = jnp.arange(seq_len)
  return attention_mask(t, t, segment_ids_BT, segment_ids_BT, window)


def soft_cap(x, cap: float | None):
  """`cap * tanh(x / cap)` (Gemma 2's logit soft-capping), `x` itself
  without a cap."""
  return cap * jnp.tanh(x / cap) if cap else x
