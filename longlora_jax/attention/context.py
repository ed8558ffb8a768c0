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
  2. Its queries attend [halo; own] keys. On NVIDIA GPUs ("pallas") one
     call of the fused Pallas kernel for all heads (`pallas.grouped.
     pallas_window_attention`): the T queries sit at key index W of the
     window, whose key 0 is at global position c * T - W, and each head
     finds its groups' global boundaries and the sequence start (a halo
     wrapped from the end is never seen) from the window's int32 scalars;
     no dummy queries, and only tiles that hold a visible pair are loaded.
     When the halves need halos of different lengths (`s2_halos`; T a
     multiple of G: none for the first, G/2 for the shifted one) and hold
     their own kv heads, each half's kv heads fetch only their own, zeros
     in front of the shorter.
     Elsewhere ("chunked") `chunked_causal_attention` (memory linear, one
     [block, block] tile per head at a time), per half: W dummy queries in
     front keep the causal order by index, and a token's id (document,
     group) hides other groups, other documents and the halo keys before
     the sequence start. The kernel takes no packed documents
     (`segment_ids_BT`): with them the chunked path runs (`dispatch.
     context_implementation`). cuDNN is not used: its masks are fixed when
     it compiles.

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
same on every device; for G = 4T 3:5 at worst). The chunked path runs the same
static window (W dummy queries + T) on every device, so no device waits on
another; the kernel skips the tiles no query sees, so its devices differ
by that ratio at most. Full attention's work grows with the slice's place
in the sequence (the kernel takes device c's queries at their offset: c + 1
slices of keys); a zig-zag split would balance it, at the price of
non-contiguous slices for S²-Attn too; not done.
"""

import functools

import jax
import jax.numpy as jnp

from longlora_jax.attention.chunked import chunked_causal_attention
from longlora_jax.attention.groups import (SHIFTED, check_variant,
                                           s2_group_size)
from longlora_jax.attention.heads import even_halves
from longlora_jax.attention.pallas.grouped import pallas_window_attention


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


KERNELS = ("pallas", "pallas_interpret")


def s2_halos(seq: int, axis_size: int, group_size: int) -> tuple[int, int]:
  """The halos ("flash") of the unshifted and the shifted half of the
  heads, whose groups start at 0 and G/2 (`halo_size`)."""
  return tuple(halo_size(seq, axis_size, group_size, offset)
               for offset in (0, group_size // 2))


def s2_context_attention(q_BTNH, k_BTKH, v_BTKH, *, axis_name: str,
                         axis_size: int, group_size: int | None = None,
                         group_ratio: float = 0.25, variant: str = "flash",
                         segment_ids_BT=None, block_size: int | None = None,
                         implementation: str = "chunked"):
  """S²-Attn of this device's slice `[batch, T, heads, head_dim]` of a
  sequence of T * `axis_size` tokens split over `axis_name` (groups of the
  whole sequence, as `dispatch.s2_attention` takes them). `implementation`:
  "chunked" (`chunked_causal_attention`, any backend), "pallas" (the fused
  kernel on windows) or "pallas_interpret" (the same through the Pallas
  interpreter)."""
  B, T, N, H = q_BTNH.shape
  seq = T * axis_size
  G = s2_group_size(seq, group_size, group_ratio)
  check_variant(variant, SHIFTED)
  shift = G // 2
  move = lambda x, offset, length: fetch(x, offset, length, axis_name,
                                         axis_size)
  start = jax.lax.axis_index(axis_name) * T
  if implementation in KERNELS:
    kernel = functools.partial(
        pallas_window_attention, group_size=G, segment_ids_BT=segment_ids_BT,
        interpret=implementation == "pallas_interpret")
    if variant == "flash":
      return _s2_window(q_BTNH, k_BTKH, v_BTKH, kernel, move, start, seq,
                        axis_size, G)
    q_BTNH, k_BTKH, v_BTKH = even_halves(q_BTNH, k_BTKH, v_BTKH)
    # The shifted half rolled by -G/2 (as in the chunked path below) makes every
    # group aligned: one call for both halves, no shift.
    q_BTNH, k_BTKH, v_BTKH = (_map_half(x, lambda h: move(h, shift, T))
                              for x in (q_BTNH, k_BTKH, v_BTKH))
    W = halo_size(seq, axis_size, G)
    out_BTNH = kernel(q_BTNH, *(_with_halo(x, (W, W), move)
                                for x in (k_BTKH, v_BTKH)),
                      q_start=W, origin=start - W, shifted=False)
    return _map_half(out_BTNH, lambda h: move(h, -shift, T))[:, :, :N]
  if implementation != "chunked":
    raise ValueError(f"unknown context attention implementation "
                     f"{implementation!r}; choose one of "
                     f"{('chunked',) + KERNELS}")
  seg_BT = (jnp.zeros((B, T), jnp.int32) if segment_ids_BT is None
            else segment_ids_BT.astype(jnp.int32))
  pos_T = start + jnp.arange(T)

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


def _s2_window(q_BTNH, k_BTKH, v_BTKH, kernel, move, start, seq, axis_size,
               G):
  """"flash" by the kernel on [halo; own] keys and values: one call for
  both halves of the heads (each finds its groups by index), the halo as
  long as the longer half needs; with kv heads split between the halves,
  each half's halo holds only the tokens it needs, the rest zeros that no
  query sees (so no more bytes move than in the chunked path)."""
  W0, W1 = s2_halos(seq, axis_size, G)
  N, K = q_BTNH.shape[2], k_BTKH.shape[2]
  lengths = (W0, W1) if N % 2 == 0 and K % 2 == 0 else (max(W0, W1),) * 2
  W = max(W0, W1)
  return kernel(q_BTNH, *(_with_halo(x, lengths, move)
                          for x in (k_BTKH, v_BTKH)),
                q_start=W, origin=start - W)


def _with_halo(x_BTKH, lengths, move):
  """[halo; own] of `max(lengths)` halo tokens, the first half of the heads
  fetching `lengths[0]` of them and the second `lengths[1]` (zeros in
  front of the shorter)."""
  W = max(lengths)
  if not W:
    return x_BTKH
  if lengths[0] == lengths[1]:
    return jnp.concatenate([move(x_BTKH, -W, W), x_BTKH], 1)
  halo = lambda h, n: jnp.pad(move(h, -n, n) if n else h[:, :0],
                              ((0, 0), (W - n, 0), (0, 0), (0, 0)))
  first, second = jnp.split(x_BTKH, 2, axis=2)
  return jnp.concatenate([
      jnp.concatenate([halo(first, lengths[0]), halo(second, lengths[1])], 2),
      x_BTKH], 1)


def _map_half(x_BTNH, fn):
  """`fn` applied to the second half of the heads."""
  first, second = jnp.split(x_BTNH, 2, axis=2)
  return jnp.concatenate([first, fn(second)], axis=2)


def full_context_attention(q_BTNH, k_BTKH, v_BTKH, *, axis_name: str,
                           axis_size: int, segment_ids_BT=None,
                           block_size: int | None = None,
                           implementation: str = "chunked"):
  """Causal attention of this device's queries over the whole sequence:
  keys, values (and segment ids) all-gathered over `axis_name`. The kernel
  ("pallas", "pallas_interpret") takes the local queries at their global
  offset and stops at the diagonal; the chunked path ("chunked") places
  them in a sequence of dummy queries, memory linear in T but the work that
  of the whole sequence's causal attention on every device."""
  B, T, N, H = q_BTNH.shape
  gather = lambda x: jax.lax.all_gather(x, axis_name, axis=1, tiled=True)
  start = jax.lax.axis_index(axis_name) * T
  if implementation in KERNELS:
    return pallas_window_attention(
        q_BTNH, gather(k_BTKH), gather(v_BTKH), q_start=start, origin=0,
        group_size=T * axis_size, shifted=False, segment_ids_BT=segment_ids_BT,
        interpret=implementation == "pallas_interpret")
  q_BSNH = jax.lax.dynamic_update_slice_in_dim(
      jnp.zeros((B, T * axis_size, N, H), q_BTNH.dtype), q_BTNH, start, 1)
  out_BSNH = chunked_causal_attention(
      q_BSNH, gather(k_BTKH), gather(v_BTKH),
      segment_ids_BT=None if segment_ids_BT is None else gather(
          segment_ids_BT),
      block_size=block_size)
  return jax.lax.dynamic_slice_in_dim(out_BSNH, start, T, 1)
