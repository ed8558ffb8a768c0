"""Causal attention in groups on cuDNN's fused flash attention: full
attention as one group (`cudnn_causal_attention`) and S²-Attn, variant-exact
(`cudnn_s2_attention`).

Every S² group (`groups`) is an independent causal attention, so S²-Attn is
a few *batched causal* attentions over groups, each one cuDNN call through
`jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")`
(`__cudnn$fmhaSoftmax` forward, `__cudnn$fmhaSoftmaxBackward` backward): no
[G, G] scores in HBM, and cuDNN's causal mask skips the tiles above each
group's diagonal. With n = N/2 query heads per half:

  "roll": the unshifted half's T/G groups and the shifted half's T/G groups
    (rolled by -G/2, the last one wrapping as in the paper) all hold G
    tokens: ONE call of batch B * 2T/G.
  "flash": the shifted half's interior groups [G/2, 3G/2), ... (the slice
    [G/2, T - G/2) folded) join the unshifted half's groups in one call of
    batch B * (2T/G - 1); the half groups [0, G/2) and [T - G/2, T) are a
    second, small call of batch 2B and length G/2 (in one G-token row a
    causal mask would let the second see the first). No attention is
    computed and thrown away.

GQA: with an even number K of kv heads, the first K/2 serve the first half of
the query heads and the rest the second, so each call gets its own kv heads
and cuDNN's GQA does the rest; odd head counts go through
`heads.even_halves`, as in `s2`.

Copies: half of the heads of a [B, T, N, H] array is strided in
memory, so each of q, k, v is written once into the call layout and the
output once back (one fusion each; "flash" adds three small ones for the
half groups). Compiled for an H100 this is the same bytes as the paper's
Algorithm 1 with the heads rolled in place.

cuDNN runs bfloat16 and float16 only, head_dim a multiple of 8 (at most 128
before Hopper, 256 on it), and no packed documents (its causal mask has no
segment boundary): `dispatch` falls back for those.
"""

import jax
import jax.numpy as jnp

from longlora_jax.attention.groups import (SHIFTED, check_variant,
                                           s2_group_size)
from longlora_jax.attention.heads import even_halves

DTYPES = (jnp.bfloat16, jnp.float16)
# What cuDNN's fused attention takes on every NVIDIA GPU since Ampere.
HEAD_DIMS = tuple(range(8, 129, 8))


def cudnn_causal_attention(q_BTNH, k_BTKH, v_BTKH, *, segment_ids_BT=None,
                           implementation: str | None = "cudnn"):
  """Plain causal attention as one cuDNN call (`__cudnn$fmha*`), with the
  attention signature: evaluation and `--full-attn` training on NVIDIA GPUs.
  `implementation` as in `cudnn_s2_attention`; no packed documents."""
  if segment_ids_BT is not None:
    raise ValueError("cuDNN attention does not support segment_ids_BT "
                     "(packed documents); use the 'chunked' implementation "
                     "for them")
  return jax.nn.dot_product_attention(
      q_BTNH, k_BTKH, v_BTKH, scale=q_BTNH.shape[3] ** -0.5, is_causal=True,
      implementation=implementation).astype(q_BTNH.dtype)


def cudnn_s2_attention(q_BTNH, k_BTKH, v_BTKH, *, group_size: int | None = None,
                       group_ratio: float = 0.25, variant: str = "flash",
                       segment_ids_BT=None, implementation: str | None = "cudnn"):
  """S²-Attn as batched causal `jax.nn.dot_product_attention` calls; same
  result as `dispatch.s2_attention`.

  Args:
    q_BTNH: `[batch, seq, q_heads, head_dim]`; k_BTKH, v_BTKH: `[batch,
      seq, kv_heads, head_dim]` (query head h reads kv head h // Q).
    group_size, group_ratio, variant: as in `dispatch.s2_attention`.
    segment_ids_BT: must be None (ValueError otherwise).
    implementation: of `jax.nn.dot_product_attention`: "cudnn" (NVIDIA
      GPUs), or "xla" (any backend and dtype; for tests).
  Returns:
    `[batch, seq, q_heads, head_dim]` in q's dtype.
  """
  if segment_ids_BT is not None:
    raise ValueError("cuDNN S²-Attn does not support segment_ids_BT (packed "
                     "documents); use the 'dense' or 'chunked' implementations "
                     "for them")
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  G = s2_group_size(T, group_size, group_ratio)
  check_variant(variant, SHIFTED)
  if N % K:
    raise ValueError(f"q_heads={N} is not a multiple of kv_heads={K}")
  half, g = G // 2, T // G
  # Shifted groups in the main call: all T/G for "roll", T/G - 1 for "flash".
  shifted = g if variant == "roll" else g - 1

  def to_groups(x_BTMH):
    """`[B, T, M, H]` -> (`[B * groups, G, M/2, H]`, the half groups
    `[2B, G/2, M/2, H]` or None): both halves of the heads M in the call
    layouts, batch outermost so a batch sharding stays on the leading axis."""
    m = x_BTMH.shape[2] // 2
    first_BTmH, second_BTmH = x_BTMH[:, :, :m], x_BTMH[:, :, m:]
    pieces = [first_BTmH.reshape(B, g, G, m, H)]
    if variant == "roll":
      pieces.append(jnp.roll(second_BTmH, -half, axis=1).reshape(
          B, g, G, m, H))
    elif shifted:
      pieces.append(second_BTmH[:, half:T - half].reshape(B, shifted, G, m, H))
    main_bGmH = jnp.concatenate(pieces, axis=1).reshape(-1, G, m, H)
    if variant == "roll":
      return main_bGmH, None
    edges_B2hmH = jnp.stack([second_BTmH[:, :half], second_BTmH[:, T - half:]],
                            axis=1)
    return main_bGmH, edges_B2hmH.reshape(2 * B, half, m, H)

  attend = lambda q, k, v: cudnn_causal_attention(
      q, k, v, implementation=implementation)
  (q_bGnH, q_edges), (k_bGkH, k_edges), (v_bGkH, v_edges) = (
      to_groups(x) for x in even_halves(q_BTNH, k_BTKH, v_BTKH))
  n = q_bGnH.shape[2]
  out_BgGnH = attend(q_bGnH, k_bGkH, v_bGkH).reshape(B, g + shifted, G, n, H)
  unshifted_BTnH = out_BgGnH[:, :g].reshape(B, T, n, H)
  shifted_BTnH = out_BgGnH[:, g:].reshape(B, shifted * G, n, H)
  if variant == "roll":
    shifted_BTnH = jnp.roll(shifted_BTnH, half, axis=1)
  else:
    edges_B2hnH = attend(q_edges, k_edges, v_edges).reshape(B, 2, half, n, H)
    shifted_BTnH = jnp.concatenate(
        [edges_B2hnH[:, 0], shifted_BTnH, edges_B2hnH[:, 1]], axis=1)
  out_BTNH = jnp.concatenate([unshifted_BTnH, shifted_BTnH], axis=2)
  return out_BTNH[:, :, :N].astype(q_BTNH.dtype)
