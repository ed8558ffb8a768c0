"""Which tiles the fused kernels visit: S²-Attn's groups (and full attention
as one group) as index arithmetic on traced int32 scalars, and the ranges of
key (query) blocks a query (key) block meets. Plain JAX, no Pallas: the
kernel bodies (`flash`) call it, and the tests evaluate it eagerly.

Tiles: a query tile of `block_q` positions (suffix T) against a key tile of
`block_k` positions (suffix S).
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


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
      # k < seq: the keys past seq are padding (see `grouped`).
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


def visit(ranges, body, carry):
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


def positions(start, size, axis):
  """`[size, 1]` (axis 0) or `[1, size]` (axis 1) int32 positions."""
  shape = (size, 1) if axis == 0 else (1, size)
  return start + lax.broadcasted_iota(jnp.int32, shape, axis)
