"""Attention over a sequence split across devices (context parallelism).

Run inside `jax.shard_map` over a mesh axis `axis_name` of `axis_size`
devices: device c holds the contiguous slice [c * T, (c + 1) * T) of every
row (T * axis_size tokens in all) and gets back its own queries' output.

S²-Attn (`s2_context_attention`) never gathers the sequence. Each half of
the heads (`heads.even_halves`) attends in groups of G that start at an
offset (0 for the first half; G/2 for the shifted half of "flash"):

  1. A device receives, by `jax.lax.ppermute`, the keys and values of the W
     tokens before its slice, W = max over devices of (c * T + offset) mod
     G < G: the earlier part of its groups (none when T is a multiple of G
     and the groups start at slice starts).
  2. Its queries attend [halo; own] keys with `chunked_causal_attention`
     (memory linear, one [block, block] tile per head at a time). W dummy
     queries in front keep the causal order by index; a token's id
     (document, group) hides other groups, other documents and the halo
     keys before the sequence start.

"roll" (the paper's leak: the first G/2 tokens of the shifted heads see the
last G/2) first rolls the shifted half's queries, keys and values by -G/2
along the whole sequence (min(G/2, T) tokens from the next slices), then
attends in aligned groups and rolls the output back.

Bytes moved per device per layer (forward): for "flash", keys and values of
W tokens per half; for "roll" also queries, keys, values and output of
half the heads x min(G/2, T) tokens. At a fixed G they never grow with the
sequence. Full attention (`full_context_attention`) all-gathers keys and
values (the whole sequence on every device) for comparison and evaluation.

Balance: the causal work of a slice grows with its place in its group, but
the shifted half's groups are offset by G/2, so a slice at the start of an
unshifted group sits mid-way in a shifted one (for G = 2T the sum is the
same on every device; for G = 4T 3:5 at worst). And the XLA path runs the
same static window (W dummy queries + T) on every device, so no device
waits on another; balancing would only cut that padded work.

The fused GPU kernels (Pallas, cuDNN) are not used here: they take queries
and keys of one length, causal by index, with groups by index and no
per-token ids, so they cannot mask a halo window by global group and
document. Step 2 is one causal attention over [halo; own] whose groups are
contiguous runs, so a kernel that took the first group's length (or
per-token ids) could run it; that is future work. This XLA path runs on
every backend.
"""

import jax
import jax.numpy as jnp

from longlora_jax.attention.chunked import chunked_causal_attention
from longlora_jax.attention.groups import check_variant, s2_group_size
from longlora_jax.attention.heads import even_halves


def fetch(x_BT, offset: int, length: int, axis_name: str, axis_size: int):
  """`[batch, length, ...]`: on device c, the tokens (c * T + offset + i)
  mod (T * axis_size) of the whole sequence for i < length, T the local
  slice length. Only the pieces that live on other devices move, one
  `ppermute` per source slice."""
  T = x_BT.shape[1]
  pieces, i = [], 0
  while i < length:
    hops = (offset + i) // T  # the source slice, relative to this device
    lo = offset + i - hops * T
    hi = min(T, lo + length - i)
    piece = x_BT[:, lo:hi]
    if hops % axis_size:
      piece = jax.lax.ppermute(
          piece, axis_name,
          [((c + hops) % axis_size, c) for c in range(axis_size)])
    pieces.append(piece)
    i += hi - lo
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)


def halo_size(seq: int, axis_size: int, group_size: int,
              offset: int = 0) -> int:
  """Tokens before its slice a device needs when groups of `group_size`
  start at `offset` + multiples of it: the most any slice start lies inside
  its group."""
  T = seq // axis_size
  return max((c * T + offset) % group_size for c in range(axis_size))


def s2_context_attention(q_BTNH, k_BTKH, v_BTKH, *, axis_name: str,
                         axis_size: int, group_size: int | None = None,
                         group_ratio: float = 0.25, variant: str = "flash",
                         segment_ids_BT=None, block_size: int | None = None):
  """S²-Attn of this device's slice `[batch, T, heads, head_dim]` of a
  sequence of T * `axis_size` tokens split over `axis_name` (groups of the
  whole sequence, as `dispatch.s2_attention` takes them)."""
  B, T, N, H = q_BTNH.shape
  seq = T * axis_size
  G = s2_group_size(seq, group_size, group_ratio)
  check_variant(variant)
  shift = G // 2
  move = lambda x, offset, length: fetch(x, offset, length, axis_name,
                                         axis_size)
  seg_BT = (jnp.zeros((B, T), jnp.int32) if segment_ids_BT is None
            else segment_ids_BT.astype(jnp.int32))
  pos_T = jax.lax.axis_index(axis_name) * T + jnp.arange(T)

  def attend(q_BTnH, k_BTkH, v_BTkH, seg_BT, offset):
    """Causal attention in groups of G starting at `offset` + kG: a
    token's id (document, group) hides other groups and documents."""
    W = halo_size(seq, axis_size, G, offset)
    ids_BT = seg_BT * (seq // G + 1) + (pos_T + offset) // G
    if not W:
      return chunked_causal_attention(q_BTnH, k_BTkH, v_BTkH,
                                      segment_ids_BT=ids_BT,
                                      block_size=block_size)
    before = lambda x: move(x, -W, W)
    # Slices wrapped around from the sequence's end hold no earlier tokens.
    ids_BW = jnp.where(pos_T[0] - W + jnp.arange(W) >= 0, before(ids_BT), -1)
    dummy_BWnH = jnp.zeros((B, W, *q_BTnH.shape[2:]), q_BTnH.dtype)
    return chunked_causal_attention(
        jnp.concatenate([dummy_BWnH, q_BTnH], 1),
        jnp.concatenate([before(k_BTkH), k_BTkH], 1),
        jnp.concatenate([before(v_BTkH), v_BTkH], 1),
        segment_ids_BT=jnp.concatenate([ids_BW, ids_BT], 1),
        block_size=block_size)[:, W:]

  q_BTNH, k_BTKH, v_BTKH = even_halves(q_BTNH, k_BTKH, v_BTKH)
  half = lambda x, i: jnp.split(x, 2, axis=2)[i]
  first_BTnH = attend(half(q_BTNH, 0), half(k_BTKH, 0), half(v_BTKH, 0),
                      seg_BT, 0)
  if variant == "flash":
    # Groups [G/2 + kG, 3G/2 + kG) in place: only keys and values move.
    second_BTnH = attend(half(q_BTNH, 1), half(k_BTKH, 1), half(v_BTKH, 1),
                         seg_BT, shift)
  else:
    # The wrapped group sees the sequence's end before its start: roll the
    # half by -G/2 (queries too), attend in aligned groups, roll back.
    roll = lambda x: move(x, shift, T)
    second_BTnH = move(attend(roll(half(q_BTNH, 1)), roll(half(k_BTKH, 1)),
                              roll(half(v_BTKH, 1)), roll(seg_BT), 0),
                       -shift, T)
  return jnp.concatenate([first_BTnH, second_BTnH], axis=2)[:, :, :N]


def full_context_attention(q_BTNH, k_BTKH, v_BTKH, *, axis_name: str,
                           axis_size: int, segment_ids_BT=None,
                           block_size: int | None = None):
  """Causal attention of this device's queries over the whole sequence:
  keys, values (and segment ids) all-gathered over `axis_name`, local
  queries placed at their global offset. Memory linear in T; the work is
  that of the whole sequence's causal attention on every device."""
  B, T, N, H = q_BTNH.shape
  gather = lambda x: jax.lax.all_gather(x, axis_name, axis=1, tiled=True)
  start = jax.lax.axis_index(axis_name) * T
  q_BSNH = jax.lax.dynamic_update_slice_in_dim(
      jnp.zeros((B, T * axis_size, N, H), q_BTNH.dtype), q_BTNH, start, 1)
  out_BSNH = chunked_causal_attention(
      q_BSNH, gather(k_BTKH), gather(v_BTKH),
      segment_ids_BT=None if segment_ids_BT is None else gather(
          segment_ids_BT),
      block_size=block_size)
  return jax.lax.dynamic_slice_in_dim(out_BSNH, start, T, 1)
