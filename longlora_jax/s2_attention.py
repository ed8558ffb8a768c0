"""Shifted sparse attention (S²-Attn), LongLoRA's training-time attention.

The sequence is cut into groups of G tokens (default seq/4) and each token
attends causally inside its group only. The first half of the query heads
uses the groups [0, G), [G, 2G), ...; the second half uses groups shifted by
G/2, so information crosses group borders. Cost and memory grow with
seq * G, not seq^2. Evaluation and generation use full attention.

Two variants of the shifted groups:

  "flash" (default): [0, G/2), [G/2, 3G/2), ..., [seq - G/2, seq), half-size
    first and last groups. What the official code computes through
    flash-attention's variable-length groups (`cu_seqlens`): no token sees a
    later one.
  "roll": the paper's Algorithm 1 and the official non-flash path. Roll the
    shifted heads by -G/2, attend in groups, roll back. The last group wraps
    around, so the first G/2 tokens of the shifted heads see the last G/2
    tokens of the sequence: it LEAKS the future into the past. Offered for
    fidelity to the paper only.

Both are computed with rolls and reshapes, never a seq x seq mask: the
shifted half of the heads is rolled by -G/2, the two halves of the heads
become two batch entries, and the sequence folds into `[batch * seq / G, G]`
rows for a causal attention ("xla": dense, "chunked": flash-style in pure
JAX). "flash" splits the wrapped last group with a segment boundary.
"""

import functools

import jax.numpy as jnp

from longlora_jax.attention import causal_attention
from longlora_jax.chunked_attention import (DEFAULT_BLOCK,
                                            chunked_causal_attention)

VARIANTS = ("flash", "roll")
IMPLEMENTATIONS = ("auto", "xla", "chunked", "pallas", "pallas_interpret")


def s2_group_size(seq: int, num_heads: int, group_size: int | None = None,
                  group_ratio: float = 0.25) -> int:
  """The group size for `seq` tokens: `group_size`, else int(seq * ratio).

  Raises ValueError unless the groups tile the sequence and have even size
  (the shift is G/2) and the query heads split into two halves.
  """
  G = int(seq * group_ratio) if group_size is None else group_size
  if G < 2 or G % 2 or seq % G:
    origin = (f"group_size={G}" if group_size is not None else
              f"group_size=int(seq * group_ratio={group_ratio})={G}")
    raise ValueError(f"S²-Attn needs an even group size that divides the "
                     f"sequence; got seq={seq}, {origin}")
  if num_heads % 2:
    raise ValueError(f"S²-Attn shifts half of the query heads; "
                     f"q_heads={num_heads} is odd")
  return G


def s2_attended_pairs(seq: int, num_heads: int, group_size: int,
                      variant: str = "flash") -> tuple[int, int]:
  """(query, key) pairs that one unshifted and one shifted head attend."""
  G = s2_group_size(seq, num_heads, group_size)
  _check_variant(variant)
  causal = lambda n: n * (n + 1) // 2
  unshifted = seq // G * causal(G)
  if variant == "roll":
    return unshifted, unshifted
  return unshifted, unshifted - causal(G) + 2 * causal(G // 2)


def s2_attention(q_BTNH, k_BTKH, v_BTKH, *, group_size: int | None = None,
                 group_ratio: float = 0.25, variant: str = "flash",
                 implementation: str = "auto", segment_ids_BT=None,
                 block_size: int = DEFAULT_BLOCK):
  """S²-Attn with the attention signature (see module docstring).

  Args:
    q_BTNH: `[batch, seq, q_heads, head_dim]`, RoPE applied (global positions).
    k_BTKH, v_BTKH: `[batch, seq, kv_heads, head_dim]`; query head h reads kv
      head h // (q_heads / kv_heads).
    group_size: tokens per group; default int(seq * group_ratio).
    variant: "flash" (no leak) or "roll" (the paper's, leaks; see above).
    implementation: attention inside the groups. "auto": "pallas" on a GPU
      when the kernel supports the shapes, else "xla" for groups of at most
      `block_size` tokens and "chunked" for larger ones. "xla": dense, memory
      seq * G per head; "chunked": `chunked_causal_attention` with
      `block_size`, memory linear in seq for any G (e.g. G = 25k at 100k
      tokens); "pallas": the fused Pallas Triton kernel
      (`pallas_s2.pallas_s2_attention`, GPU, default tiles; no
      `segment_ids_BT`, `block_size` unused); "pallas_interpret": the same
      kernel through the Pallas interpreter (any backend, slow; for tests).
    segment_ids_BT: packed documents; tokens never attend across them.
  Returns:
    `[batch, seq, q_heads, head_dim]`.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  G = s2_group_size(T, N, group_size, group_ratio)
  _check_variant(variant)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown S²-Attn implementation {implementation!r}; "
                     f"choose one of {IMPLEMENTATIONS}")
  if implementation == "auto" and takes_fused_kernel(
      H, packed=segment_ids_BT is not None):
    implementation = "pallas"
  if implementation in ("pallas", "pallas_interpret"):
    # Imported here: the kernel module builds on this one.
    from longlora_jax.pallas_s2 import pallas_s2_attention
    return pallas_s2_attention(
        q_BTNH, k_BTKH, v_BTKH, group_size=G, variant=variant,
        segment_ids_BT=segment_ids_BT,
        interpret=implementation == "pallas_interpret")
  if N % K:
    raise ValueError(f"q_heads={N} is not a multiple of kv_heads={K}")
  if implementation == "auto":
    implementation = "xla" if G <= block_size else "chunked"
  attend = (causal_attention if implementation == "xla" else
            functools.partial(chunked_causal_attention, block_size=block_size))
  shift = G // 2

  # With an odd number of kv heads the middle one serves query heads of both
  # halves (read unshifted by one, shifted by the other). Two copies of every
  # kv head, one per half of its query heads, let each half keep the uniform
  # [kv_heads, group] layout: K/V memory doubles, never grows per query head
  # (unless q_heads = 2 * kv_heads). Even kv heads split without copies.
  copies = 1 if K % 2 == 0 else 2
  if copies > 1:
    k_BTKH, v_BTKH = (jnp.repeat(x, copies, axis=2) for x in (k_BTKH, v_BTKH))
  fold = lambda x_2BT: x_2BT.reshape(2 * B * T // G, G, *x_2BT.shape[2:])
  q_gGnH, k_gGkH, v_gGkH = (fold(_split_heads(x, shift))
                            for x in (q_BTNH, k_BTKH, v_BTKH))

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
  return _merge_heads(out_gGnH.reshape(2 * B, T, N // 2, H), shift)


def takes_fused_kernel(head_dim: int, *, packed: bool = False,
                       platform: str | None = None) -> bool:
  """Whether "auto" takes the fused kernel: on a GPU (`platform`, default
  JAX's default backend), without packed segments, for a head_dim it has."""
  import jax
  from longlora_jax import pallas_s2
  return (pallas_s2.AVAILABLE and not packed
          and (platform or jax.default_backend()) == "gpu"
          and head_dim in pallas_s2.HEAD_DIMS)


def _split_heads(x_BTND, shift):
  """`[batch, seq, heads, d]` -> `[2 * batch, seq, heads / 2, d]`: the first
  half of the heads, then the second half rolled by -shift along seq."""
  B, T, N, D = x_BTND.shape
  x_BT2nD = x_BTND.reshape(B, T, 2, N // 2, D)
  return jnp.concatenate([x_BT2nD[:, :, 0],
                          jnp.roll(x_BT2nD[:, :, 1], -shift, axis=1)])


def _merge_heads(x_2BTnD, shift):
  """Inverse of `_split_heads`."""
  first_BTnD, second_BTnD = jnp.split(x_2BTnD, 2)
  B, T, n, D = first_BTnD.shape
  return jnp.stack([first_BTnD, jnp.roll(second_BTnD, shift, axis=1)],
                   axis=2).reshape(B, T, 2 * n, D)


def _check_variant(variant):
  if variant not in VARIANTS:
    raise ValueError(f"unknown S²-Attn variant {variant!r}; choose one of "
                     f"{VARIANTS}")
