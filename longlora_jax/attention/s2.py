"""S²-Attn by reshapes and rolls (the groups: see `groups`).

The shifted half of the heads is rolled by -G/2, the two halves of the
heads become two batch entries, and the sequence folds into `[batch * seq /
G, G]` rows for a causal attention ("dense", or "chunked": flash-style in
pure JAX); never a seq x seq mask. "flash" splits the wrapped last group
with a segment boundary. Cost and memory grow with seq * G, not seq^2.
"""

import functools

import jax.numpy as jnp

from longlora_jax.attention.chunked import chunked_causal_attention
from longlora_jax.attention.dense import dense_causal_attention
from longlora_jax.attention.groups import shift as group_shift
from longlora_jax.attention.heads import even_halves

INNER = ("dense", "chunked")


def s2_by_reshape(q_BTNH, k_BTKH, v_BTKH, *, group_size: int, variant: str,
                  inner: str, block_size: int, segment_ids_BT=None,
                  softcap: float | None = None):
  """S²-Attn with groups of `group_size` (checked by the caller), attention
  inside the groups by `inner` ("dense": memory seq * G per head;
  "chunked": `chunked_causal_attention` with `block_size`, memory linear in
  seq for any G, e.g. G = 25k at 100k tokens)."""
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  G = group_size
  if N % K:
    raise ValueError(f"q_heads={N} is not a multiple of kv_heads={K}")
  if inner not in INNER:
    raise ValueError(f"unknown inner attention {inner!r}; choose one of "
                     f"{INNER}")
  attend = functools.partial(
      dense_causal_attention if inner == "dense" else functools.partial(
          chunked_causal_attention, block_size=block_size), softcap=softcap)
  shift = group_shift(G, variant)  # 0: "none", groups only

  fold = lambda x_2BT: x_2BT.reshape(2 * B * T // G, G, *x_2BT.shape[2:])
  q_gGnH, k_gGkH, v_gGkH = (fold(_split_heads(x, shift))
                            for x in even_halves(q_BTNH, k_BTKH, v_BTKH))

  segments_gG = None
  if segment_ids_BT is not None or variant == "flash":
    seg_BT = (jnp.zeros((B, T), jnp.int32) if segment_ids_BT is None
              else segment_ids_BT)
    shifted_BT = jnp.roll(seg_BT, -shift, axis=1)
    if variant == "flash":
      # The rolled last group holds the sequence's last G/2 tokens followed
      # by its first G/2; a segment boundary makes them two groups. 2s + w
      # keeps distinct documents distinct.
      wrapped_T = (jnp.arange(T) >= T - shift).astype(seg_BT.dtype)
      shifted_BT = 2 * shifted_BT + wrapped_T
    segments_gG = fold(jnp.concatenate([seg_BT, shifted_BT]))

  out_gGnH = attend(q_gGnH, k_gGkH, v_gGkH, segment_ids_BT=segments_gG)
  n = q_gGnH.shape[2]
  return _merge_heads(out_gGnH.reshape(2 * B, T, n, H), shift)[:, :, :N]


def _split_heads(x_BTNH, shift):
  """`[batch, seq, heads, head_dim]` -> `[2 * batch, seq, heads / 2,
  head_dim]`: the first half of the heads, then the second half rolled by
  -shift along seq."""
  B, T, N, H = x_BTNH.shape
  x_BT2nH = x_BTNH.reshape(B, T, 2, N // 2, H)
  return jnp.concatenate([x_BT2nH[:, :, 0],
                          jnp.roll(x_BT2nH[:, :, 1], -shift, axis=1)])


def _merge_heads(x_2BTnH, shift):
  """Inverse of `_split_heads`."""
  first_BTnH, second_BTnH = jnp.split(x_2BTnH, 2)
  B, T, n, H = first_BTnH.shape
  return jnp.stack([first_BTnH, jnp.roll(second_BTnH, shift, axis=1)],
                   axis=2).reshape(B, T, 2 * n, H)
