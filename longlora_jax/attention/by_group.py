"""S²-Attn one group at a time: the rows of each piece, and the attention
inside one piece.

S²-Attn's groups are independent causal attentions (`groups`), so the
whole attention block of a layer (norm, q/k/v, attention, o) can run over
the sequence piece by piece, each piece recomputed in the backward pass:
its q, k, v, scores' statistics and their gradients then exist for one
piece's 2 x G rows at a time, half of the sequence at the default G =
seq/4, where `s2_attention` holds them for the whole sequence at once.

Piece j holds 2 * batch rows of G tokens, interleaved (row 2b + 0, 2b + 1
for batch entry b): the unshifted half of the heads reads tokens [jG,
(j+1)G) (`rows`' first array) and the shifted half the tokens of its j-th
group, [jG + G/2, (j+1)G + G/2) modulo seq (the second). The model projects
every head on both, and `S2ByGroup` keeps each half's heads on its own rows
and returns zeros for the others, so that the o projection of a piece is
the piece's contribution to each of its rows. Added into the rows they
came from and summed over the pieces, that is S²-Attn's output, for
"flash", "roll" and "none" alike: with "flash" the last piece's shifted rows, [seq -
G/2, seq) then [0, G/2), are two groups of G/2 (`jax.lax.cond` on the
piece's index, so one compiled body serves every piece).
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from longlora_jax.attention.groups import (check_variant, s2_group_size,
                                           shift as group_shift)


@dataclasses.dataclass(frozen=True)
class S2ByGroup:
  """S²-Attn, run by the model one group at a time (see the module).

  group_ratio, variant: S²-Attn's groups (`groups`).
  attend: causal attention with the attention signature (`dispatch.
    full_attention` with an implementation), run inside each piece.
  """
  group_ratio: float
  variant: str
  attend: Callable[..., jax.Array]

  def __post_init__(self):
    check_variant(self.variant)

  def rows(self, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """(unshifted rows `[pieces, G]`, shifted rows `[pieces, G]`): the
    token indices each piece reads for either half of the heads."""
    G = s2_group_size(seq, None, self.group_ratio)
    unshifted_gG = np.arange(seq, dtype=np.int32).reshape(seq // G, G)
    return unshifted_gG, (unshifted_gG + group_shift(G, self.variant)) % seq

  def __call__(self, q_bGNH, k_bGKH, v_bGKH, *, piece, pieces: int,
               segment_ids_BT=None):
    """The attention of piece `piece` of `pieces`.

    Args:
      q_bGNH: `[2 * batch, G, q_heads, head_dim]`, RoPE applied: every
        head on the unshifted rows (even rows) and the shifted rows (odd).
      k_bGKH, v_bGKH: `[2 * batch, G, kv_heads, head_dim]`, likewise.
      piece: the piece's index (may be traced); pieces: how many.
      segment_ids_BT: `[2 * batch, G]` packed documents, or None.
    Returns:
      `[2 * batch, G, q_heads, head_dim]`: the unshifted heads' output on
      the even rows and the shifted heads' on the odd ones, zero elsewhere.
    """
    b, G, N, H = q_bGNH.shape
    K = k_bGKH.shape[2]
    if N % 2 or K % 2:
      raise ValueError(f"S²-Attn by group needs even numbers of query and "
                       f"kv heads (each half reads its own kv heads); got "
                       f"q_heads={N}, kv_heads={K}")
    def halves(x_bGMH):
      """Each row's own half of the heads: `[b, G, M, H]` -> `[b, G, M/2,
      H]`."""
      m = x_bGMH.shape[2] // 2
      x = x_bGMH.reshape(b // 2, 2, G, 2 * m, H)
      return jnp.stack([x[:, 0, :, :m], x[:, 1, :, m:]], axis=1).reshape(
          b, G, m, H)

    qkv = [halves(x) for x in (q_bGNH, k_bGKH, v_bGKH)]

    def whole(q, k, v, seg):
      return self.attend(q, k, v, segment_ids_BT=seg)

    def wrapped(q, k, v, seg):
      # The shifted rows of the last piece are two groups of G/2.
      split = lambda x: x.reshape(b // 2, 2, *x.shape[1:])
      unshifted = whole(*(split(x)[:, 0] for x in (q, k, v)),
                        None if seg is None else split(seg)[:, 0])
      two = lambda x: split(x)[:, 1].reshape(b, G // 2, *x.shape[2:])
      shifted = whole(*(two(x) for x in (q, k, v)),
                      None if seg is None else two(seg))
      return jnp.stack([unshifted, shifted.reshape(unshifted.shape)],
                       axis=1).reshape(q.shape)

    if self.variant == "flash":
      out_bGnH = jax.lax.cond(piece == pieces - 1, wrapped, whole, *qkv,
                              segment_ids_BT)
    else:
      out_bGnH = whole(*qkv, segment_ids_BT)
    out = out_bGnH.reshape(b // 2, 2, G, N // 2, H)
    zero = jnp.zeros_like(out[:, 0])
    return jnp.stack([jnp.concatenate([out[:, 0], zero], axis=-2),
                      jnp.concatenate([zero, out[:, 1]], axis=-2)],
                     axis=1).reshape(b, G, N, H)
