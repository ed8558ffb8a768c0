"""The fused S²-Attn kernels' bodies (Pallas, GPU Triton backend) and the
block arithmetic that decides which tiles they visit. `pallas_s2` launches
them; see there for the algorithm and its constraints.

Tiles: a query tile of `block_q` positions (suffix T) against a key tile of
`block_k` positions (suffix S), head_dim H.
"""

import dataclasses
import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# jax 0.11 deprecates Pallas Triton (docs/kernels.md) and warns at every
# lowering of a kernel from 0.12; the kernels still build with it.
warnings.filterwarnings("ignore", message=".*Triton backend is deprecated",
                        category=DeprecationWarning)
try:
  from jax.experimental import pallas as pl
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas import triton as plgpu
  IMPORT_ERROR = None
except ImportError as e:  # depends on the installed jax
  pl = plgpu = None
  IMPORT_ERROR = e

AVAILABLE = IMPORT_ERROR is None
# A finite "minus infinity": a row whose first tiles are all masked gets
# weights exp2(0) = 1 there, which the rescale exp2(_MASK - m) = 0 erases once
# its own key arrives (always visited). -inf would give NaN (-inf - -inf).
_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)


class Frame(NamedTuple):
  """Where one query head's groups lie in the kernel's index space (int32
  scalars, traced): the key index of query 0, the first group boundary at
  or after key 0 (boundaries are that + multiples of the group size), and
  the first key that exists (keys before it lie before the sequence)."""
  q_start: jax.Array
  offset: jax.Array
  floor: jax.Array


@dataclasses.dataclass(frozen=True)
class Groups:
  """Which keys a query sees. The last heads // 2 query heads use group
  boundaries at `shift` + multiples of `size` (plus 0), the others at
  multiples of `size`; a query sees the keys from its group's start up to
  itself. `wrap` (the "roll" variant): a shifted head's queries t < shift
  also see the keys [seq - shift, seq).

  The kernels may run on a window of a longer sequence (`scalars`): query
  i sits at key index q_start + i, and key index j at global position
  origin + j, where the boundaries above are global. `seq`: the number of
  real keys (the rest is padding)."""
  seq: int
  size: int
  shift: int
  wrap: bool
  heads: int

  def scalars(self, q_start=0, origin=0):
    """int32 [4], the kernels' scalar input: q_start and, for the window
    whose key 0 is at global position `origin` (may be traced or negative),
    the first boundary at or after key 0 of the unshifted and shifted heads
    and the first key at or after global position 0."""
    static = isinstance(q_start, int) and isinstance(origin, int)
    if self.wrap and not (static and q_start == origin == 0):
      raise ValueError("the wrapped (roll) groups need the whole sequence")
    xp = np if static else jnp  # a constant needs no concatenation
    return xp.stack([xp.asarray(q_start), xp.mod(-origin, self.size),
                     xp.mod(self.shift - origin, self.size),
                     xp.maximum(-origin, 0)]).astype(np.int32)

  def frame(self, scalars_ref, head) -> Frame:
    """The `Frame` of a traced query head index: the shifted boundaries
    for the last floor(heads / 2) heads (`groups.shifted_heads`)."""
    first_shifted = self.heads - self.heads // 2
    return Frame(scalars_ref[0],
                 _select(head >= first_shifted, scalars_ref[2],
                         scalars_ref[1]),
                 scalars_ref[3])

  def end(self, t, frame):
    """The first group boundary after key index t (may pass seq)."""
    return (lax.div(t + (self.size - frame.offset), self.size) * self.size
            + frame.offset)

  def start(self, t, frame):
    """Start of t's group; no group reaches before the floor (so the first
    shifted group is [0, shift))."""
    return jnp.maximum(self.end(t, frame) - self.size, frame.floor)

  def visible(self, qpos, kpos, frame):
    """Bool, whether each query sees each key, by key index (query and key
    indices broadcast against each other: `[T, 1]` and `[1, S]` give
    `[T, S]`, `[1, T]` and `[S, 1]` give `[S, T]`): the one definition of
    the S² mask here."""
    visible = (kpos <= qpos) & (kpos >= self.start(qpos, frame))
    if self.wrap:
      # k < seq: the keys past seq are padding (see `_attention`).
      visible |= (qpos < frame.offset) & (kpos >= self.seq - frame.offset) & (
          kpos < self.seq)
    return visible


# Block ranges. Each returns (lo, a, b, hi, wrap): blocks [lo, a) and
# [b, hi) need the mask, [a, b) are entirely visible, and wrap = (wrap_lo,
# wrap_hi) are the roll variant's wrapped blocks not already in [lo, hi)
# (None for the other groups: no loop at all).

def key_blocks(groups, q0, block_q, block_k, frame):
  """Key blocks that the queries at key indices [q0, q0 + block_q)
  attend."""
  q_last = q0 + block_q - 1
  lo = lax.div(groups.start(q0, frame), block_k)
  hi = lax.div(q_last, block_k) + 1
  # Entirely visible: at or after the last row's group start and at or
  # before the first row.
  a = jnp.minimum(_cdiv(groups.start(q_last, frame), block_k), hi)
  b = jnp.maximum(a, jnp.minimum(lax.div(q0 + 1, block_k), hi))
  wrap = None
  if groups.wrap:
    wrap_lo = jnp.maximum(lax.div(groups.seq - frame.offset, block_k), hi)
    wrap = wrap_lo, _select(q0 < frame.offset, _cdiv(groups.seq, block_k),
                            wrap_lo)
  return lo, a, b, hi, wrap


def query_blocks(groups, k0, block_k, block_q, frame, queries):
  """Blocks of the `queries` queries (query block i holds key indices
  q_start + [i * block_q, (i + 1) * block_q)) that attend the keys
  [k0, k0 + block_k)."""
  k_last = k0 + block_k - 1
  first = lambda k: k - frame.q_start  # query index of key index k
  lo = lax.div(jnp.maximum(first(k0), 0), block_q)
  hi = jnp.minimum(_cdiv(first(jnp.minimum(groups.end(k_last, frame),
                                           groups.seq)), block_q),
                   queries // block_q)
  # No query sees a key before the floor.
  hi = _select(k_last >= frame.floor, jnp.maximum(hi, lo), lo)
  # Entirely visible: every row at or after the last key, and in a group
  # that starts at or before the first key.
  a = jnp.clip(_cdiv(first(k_last), block_q), lo, hi)
  b = jnp.maximum(a, jnp.minimum(
      lax.div(jnp.maximum(first(groups.end(k0, frame)), 0), block_q), hi))
  b = _select(k0 >= frame.floor, b, a)
  wrap = None
  if groups.wrap:
    wrap = jnp.int32(0), _select(k_last >= groups.seq - frame.offset,
                                 jnp.minimum(_cdiv(frame.offset, block_q), lo),
                                 0)
  return lo, a, b, hi, wrap


def _visit(ranges, body, carry):
  """Runs `body(index, carry, masked=...)` over the blocks of `ranges`."""
  lo, a, b, hi, wrap = ranges
  loops = [(lo, a, True), (a, b, False), (b, hi, True)]
  if wrap is not None:
    loops.append((*wrap, True))
  for start, stop, masked in loops:
    carry = lax.fori_loop(start, stop,
                          functools.partial(body, masked=masked), carry)
  return carry


def _cdiv(a, b):
  return lax.div(a + (b - 1), b)


def _select(condition, a, b):
  """Scalar int32 select; jnp.where with Python ints fails to lower to
  Triton (jax 0.10: i1 operands)."""
  return lax.select(condition, jnp.asarray(a, jnp.int32),
                    jnp.asarray(b, jnp.int32))


def _positions(start, size, axis):
  """`[size, 1]` (axis 0) or `[1, size]` (axis 1) int32 positions."""
  shape = (size, 1) if axis == 0 else (1, size)
  return start + lax.broadcasted_iota(jnp.int32, shape, axis)


def softmax_init(block_q, head_dim):
  """The online softmax's (accumulator, running max, running sum) before
  the first key block, float32."""
  return (jnp.zeros((block_q, head_dim), jnp.float32),
          jnp.full((block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))


def softmax_step(carry, s_TS, v_SH):
  """One key block of the online softmax: base-2 scores `s_TS` (masked
  ones at `_MASK`) and the block's values; the running max rescales what
  came before."""
  acc_TH, m_T, l_T = carry
  m_new = jnp.maximum(m_T, s_TS.max(axis=1))
  correction_T = jnp.exp2(m_T - m_new)
  p_TS = jnp.exp2(s_TS - m_new[:, None])
  l_T = l_T * correction_T + p_TS.sum(axis=1)
  acc_TH = acc_TH * correction_T[:, None] + plgpu.dot(
      p_TS.astype(v_SH.dtype), v_SH)
  return acc_TH, m_new, l_T


def forward_kernel(scalars_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                   groups, block_k):
  block_q, head_dim = q_ref.shape
  frame = groups.frame(scalars_ref, pl.program_id(2))
  q0 = frame.q_start + pl.program_id(0) * block_q
  q_TH = q_ref[...]
  qpos_T1 = _positions(q0, block_q, 0)
  scale = head_dim ** -0.5 * _LOG2E

  def key_block(j, carry, masked):
    keys = pl.ds(j * block_k, block_k)
    s_TS = plgpu.dot(q_TH, k_ref[keys, :], trans_b=True) * scale
    if masked:
      s_TS = jnp.where(
          groups.visible(qpos_T1, _positions(j * block_k, block_k, 1), frame),
          s_TS, _MASK)
    return softmax_step(carry, s_TS, v_ref[keys, :])

  acc_TH, m_T, l_T = _visit(
      key_blocks(groups, q0, block_q, block_k, frame), key_block,
      softmax_init(block_q, head_dim))
  o_ref[...] = (acc_TH / l_T[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m_T + jnp.log2(l_T)


def dq_kernel(scalars_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
              dq_ref, *, groups, block_k):
  block_q, head_dim = q_ref.shape
  frame = groups.frame(scalars_ref, pl.program_id(2))
  q0 = frame.q_start + pl.program_id(0) * block_q
  q_TH, do_TH = q_ref[...], do_ref[...]
  lse_T, delta_T = lse_ref[...], delta_ref[...]
  qpos_T1 = _positions(q0, block_q, 0)
  scale = head_dim ** -0.5

  def key_block(j, dq_TH, masked):
    keys = pl.ds(j * block_k, block_k)
    k_SH = k_ref[keys, :]
    s_TS = plgpu.dot(q_TH, k_SH, trans_b=True) * (scale * _LOG2E)
    if masked:
      s_TS = jnp.where(
          groups.visible(qpos_T1, _positions(j * block_k, block_k, 1), frame),
          s_TS, _MASK)
    p_TS = jnp.exp2(s_TS - lse_T[:, None])
    dp_TS = plgpu.dot(do_TH, v_ref[keys, :], trans_b=True)
    ds_TS = p_TS * (dp_TS - delta_T[:, None])
    return dq_TH + plgpu.dot(ds_TS.astype(k_SH.dtype), k_SH)

  dq_TH = _visit(key_blocks(groups, q0, block_q, block_k, frame),
                 key_block, jnp.zeros((block_q, head_dim), jnp.float32))
  dq_ref[...] = (dq_TH * scale).astype(dq_ref.dtype)


def dkv_kernel(scalars_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               dk_ref, dv_ref, *, groups, block_q):
  """Key-major: the tiles are [key, query] (P^T, dP^T, dS^T), so that both
  accumulating products take their operands as stored and no register tile
  is transposed."""
  block_k, head_dim = k_ref.shape
  queries, Q = q_ref.shape[:2]
  k0 = pl.program_id(0) * block_k
  first_head = pl.program_id(2) * Q
  k_SH, v_SH = k_ref[...], v_ref[...]
  kpos_S1 = _positions(k0, block_k, 0)
  scale = head_dim ** -0.5

  def query_head(r, carry):
    frame = groups.frame(scalars_ref, first_head + r)

    def query_block(i, carry, masked):
      dk_SH, dv_SH = carry
      queries = pl.ds(i * block_q, block_q)
      q_TH, do_TH = q_ref[queries, r, :], do_ref[queries, r, :]
      s_ST = plgpu.dot(k_SH, q_TH, trans_b=True) * (scale * _LOG2E)
      if masked:
        s_ST = jnp.where(
            groups.visible(_positions(frame.q_start + i * block_q, block_q, 1),
                           kpos_S1, frame),
            s_ST, _MASK)
      p_ST = jnp.exp2(s_ST - lse_ref[r, queries][None, :])
      dv_SH += plgpu.dot(p_ST.astype(do_TH.dtype), do_TH)
      dp_ST = plgpu.dot(v_SH, do_TH, trans_b=True)
      ds_ST = p_ST * (dp_ST - delta_ref[r, queries][None, :])
      dk_SH += plgpu.dot(ds_ST.astype(q_TH.dtype), q_TH)
      return dk_SH, dv_SH

    return _visit(query_blocks(groups, k0, block_k, block_q, frame, queries),
                  query_block, carry)

  zeros = jnp.zeros((block_k, head_dim), jnp.float32)
  dk_SH, dv_SH = lax.fori_loop(0, Q, query_head, (zeros, zeros))
  dk_ref[...] = (dk_SH * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_SH.astype(dv_ref.dtype)
