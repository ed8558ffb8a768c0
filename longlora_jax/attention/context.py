"""Attention over a sequence split across devices (context parallelism).

Run inside `jax.shard_map` over a mesh axis `axis_name` of `axis_size`
devices: device c holds the contiguous slice [c * L, (c + 1) * L) of every
row (T = L * axis_size tokens in all) and gets back its own queries' output.

S²-Attn (`s2_context_attention`) never gathers the sequence. It is
`s2.s2_by_reshape` with the two global moves done by `jax.lax.ppermute`:

  1. The shifted half of the heads (q, k, v and the segment ids) is rolled
     by -G/2 along the global sequence. Each device receives the next
     min(G/2, L) tokens of that half from its neighbour(s). After the roll
     both halves have groups aligned at multiples of G in their own order,
     so one code path serves both; "flash" splits the wrapped last group
     with an id, as `s2` does, and "roll" keeps it whole (the paper's leak).
  2. Each device receives the keys/values of the W tokens before its slice,
     W = max over devices of (c * L) mod G < G: exactly the earlier part of
     its groups (none when L is a multiple of G).
  3. Its queries attend [halo; own] keys with `chunked_causal_attention`
     (memory linear, one [block, block] tile per head at a time). Its W
     dummy queries in front keep the causal order by index; a token's id
     (segment, wrapped flag, group) hides other groups, other documents and
     halo keys before the sequence start.
  4. The shifted half's output is rolled back by +G/2.

Bytes moved per device per layer: (q, k, v, out of half the heads) x
min(G/2, L) + (k, v) x W tokens: they grow with G, never with T at a fixed
G. Full attention (`full_context_attention`) all-gathers keys and values
(T tokens per device) for comparison and evaluation.

Balance: the causal work of a slice grows with its place in its group, but
with contiguous slices the shifted half's groups are offset by G/2, so a
device at the start of an unshifted group sits mid-way in a shifted one
(for G = 2L exactly balanced, for G = 4L 3:5 at worst). And the XLA path
runs the same static window (W dummy queries + L) on every device, so no
device waits on another; balancing would only cut that padded work.

The fused GPU kernels (Pallas, cuDNN) are not used here: they take queries
and keys of one length, causal by index, with no per-token ids (no segment
ids), so they cannot express the halo window with the group and wrap
masks. They could run step 3 as a causal attention over [halo; own] with
block-diagonal masks when W and L are multiples of their tiles; that is
future work. This XLA path runs on every backend.
"""

import jax
import jax.numpy as jnp

from longlora_jax.attention.chunked import chunked_causal_attention
from longlora_jax.attention.groups import check_variant, s2_group_size
from longlora_jax.attention.heads import even_halves


def fetch(x_BL, offset: int, length: int, axis_name: str, axis_size: int):
  """`[batch, length, ...]`: on device c, the global tokens (c * L + offset
  + i) mod T for i < length, L the local slice length. Only the pieces that
  live on other devices move, one `ppermute` per source slice."""
  L = x_BL.shape[1]
  pieces, i = [], 0
  while i < length:
    hops = (offset + i) // L  # the source slice, relative to this device
    lo = offset + i - hops * L
    hi = min(L, lo + length - i)
    piece = x_BL[:, lo:hi]
    if hops % axis_size:
      piece = jax.lax.ppermute(
          piece, axis_name,
          [((c + hops) % axis_size, c) for c in range(axis_size)])
    pieces.append(piece)
    i += hi - lo
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)


def halo_size(seq: int, axis_size: int, group_size: int) -> int:
  """Tokens before its slice a device needs for aligned groups of
  `group_size`: the most any slice start lies inside its group."""
  L = seq // axis_size
  return max(c * L % group_size for c in range(axis_size))


def s2_context_attention(q_BLNH, k_BLKH, v_BLKH, *, axis_name: str,
                         axis_size: int, group_size: int | None = None,
                         group_ratio: float = 0.25, variant: str = "flash",
                         segment_ids_BT=None, block_size: int | None = None):
  """S²-Attn of this device's slice `[batch, L, heads, head_dim]` of a
  sequence split over `axis_name` (groups of the global sequence, as
  `dispatch.s2_attention` takes them)."""
  B, L, N, H = q_BLNH.shape
  T = L * axis_size
  G = s2_group_size(T, group_size, group_ratio)
  check_variant(variant)
  shift = G // 2
  move = lambda x, offset, length: fetch(x, offset, length, axis_name,
                                         axis_size)

  def halves(x_BLNH):  # -> [2 * batch, L, heads / 2, head_dim]
    n = x_BLNH.shape[2] // 2
    return jnp.concatenate([x_BLNH[:, :, :n], move(x_BLNH[:, :, n:], shift, L)])

  q_2BLnH, k_2BLkH, v_2BLkH = map(halves, even_halves(q_BLNH, k_BLKH, v_BLKH))
  seg_BL = (jnp.zeros((B, L), jnp.int32) if segment_ids_BT is None
            else segment_ids_BT.astype(jnp.int32))
  # Both halves in their own (rolled) order: token c * L + i, groups of G.
  order_L = jax.lax.axis_index(axis_name) * L + jnp.arange(L)
  wrapped_L = (order_L >= T - shift) & (variant == "flash")
  seg_2BL = jnp.concatenate([2 * seg_BL, 2 * move(seg_BL, shift, L)
                             + wrapped_L.astype(jnp.int32)])
  ids_2BL = seg_2BL * (T // G) + order_L // G

  W = halo_size(T, axis_size, G)
  if W:
    before = lambda x: move(x, -W, W)
    order_W = order_L[0] - W + jnp.arange(W)
    # Slices wrapped around from the sequence's end hold no earlier tokens.
    ids_2BW = jnp.where(order_W >= 0, before(ids_2BL), -1)
    dummy_2BWnH = jnp.zeros((q_2BLnH.shape[0], W, *q_2BLnH.shape[2:]),
                            q_2BLnH.dtype)
    q_2BLnH = jnp.concatenate([dummy_2BWnH, q_2BLnH], 1)
    k_2BLkH = jnp.concatenate([before(k_2BLkH), k_2BLkH], 1)
    v_2BLkH = jnp.concatenate([before(v_2BLkH), v_2BLkH], 1)
    ids_2BL = jnp.concatenate([ids_2BW, ids_2BL], 1)
  out_2BLnH = chunked_causal_attention(
      q_2BLnH, k_2BLkH, v_2BLkH, segment_ids_BT=ids_2BL,
      block_size=block_size)[:, W:]
  first_BLnH, second_BLnH = jnp.split(out_2BLnH, 2)
  return jnp.concatenate([first_BLnH, move(second_BLnH, -shift, L)],
                         axis=2)[:, :, :N]


def full_context_attention(q_BLNH, k_BLKH, v_BLKH, *, axis_name: str,
                           axis_size: int, segment_ids_BT=None,
                           block_size: int | None = None):
  """Causal attention of this device's queries over the whole sequence:
  keys, values (and segment ids) all-gathered over `axis_name`, local
  queries placed at their global offset. Memory linear in T; the work is
  that of the whole sequence's causal attention on every device."""
  B, L, N, H = q_BLNH.shape
  gather = lambda x: jax.lax.all_gather(x, axis_name, axis=1, tiled=True)
  start = jax.lax.axis_index(axis_name) * L
  q_BTNH = jax.lax.dynamic_update_slice_in_dim(
      jnp.zeros((B, L * axis_size, N, H), q_BLNH.dtype), q_BLNH, start, 1)
  out_BTNH = chunked_causal_attention(
      q_BTNH, gather(k_BLKH), gather(v_BLKH),
      segment_ids_BT=None if segment_ids_BT is None else gather(
          segment_ids_BT),
      block_size=block_size)
  return jax.lax.dynamic_slice_in_dim(out_BTNH, start, L, 1)
