"""The fused kernels' bodies in Pallas (GPU Triton backend): flash
attention's online softmax, forward and backward (dQ; dK/dV key-major), over
the tiles `blocks` picks. `grouped` and `cached` launch them; see `grouped`
for the algorithm and its constraints. The one place that imports Pallas
Triton: if it cannot be imported, `AVAILABLE` is False (`IMPORT_ERROR` says
why) and the launchers raise ImportError when called.

Tiles: a query tile of `block_q` positions (suffix T) against a key tile of
`block_k` positions (suffix S), head_dim H.
"""

import math
import warnings

import jax.numpy as jnp
from jax import lax

from longlora_jax.attention.pallas.blocks import (key_blocks, positions,
                                                  query_blocks, visit)

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
# The head dims the kernels have tiles for (`grouped.default_config`,
# `cached`).
HEAD_DIMS = (64, 128)
# A finite "minus infinity" for masked scores: a row whose first tiles are
# all masked gets weights exp2(0) = 1 there, which the rescale exp2(MASK -
# m) = 0 erases once its own key arrives (always visited). -inf would give
# NaN (-inf - -inf).
MASK = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)


def softmax_init(block_q, head_dim):
  """The online softmax's (accumulator, running max, running sum) before
  the first key block, float32."""
  return (jnp.zeros((block_q, head_dim), jnp.float32),
          jnp.full((block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))


def softmax_step(carry, s_TS, v_SH):
  """One key block of the online softmax: base-2 scores `s_TS` (masked
  ones at `MASK`) and the block's values; the running max rescales what
  came before."""
  acc_TH, m_T, l_T = carry
  m_new = jnp.maximum(m_T, s_TS.max(axis=1))
  correction_T = jnp.exp2(m_T - m_new)
  p_TS = jnp.exp2(s_TS - m_new[:, None])
  l_T = l_T * correction_T + p_TS.sum(axis=1)
  acc_TH = acc_TH * correction_T[:, None] + plgpu.dot(
      p_TS.astype(v_SH.dtype), v_SH)
  return acc_TH, m_new, l_T


def capped(s, softcap):
  """(cap * tanh(s / cap), its slope 1 - tanh^2) for scaled scores `s`
  (Gemma 2's soft-cap); (s, None) without a cap."""
  if not softcap:
    return s, None
  t = jnp.tanh(s / softcap)
  return softcap * t, 1.0 - t * t


def forward_kernel(scalars_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                   groups, block_k, softcap=None):
  """One query block of one head (grid: query block, batch, query head):
  the output and its base-2 log-sum-exp over the key blocks it sees."""
  block_q, head_dim = q_ref.shape
  frame = groups.frame(scalars_ref, pl.program_id(2))
  q0 = frame.q_start + pl.program_id(0) * block_q
  q_TH = q_ref[...]
  qpos_T1 = positions(q0, block_q, 0)
  scale = head_dim ** -0.5

  def key_block(j, carry, masked):
    keys = pl.ds(j * block_k, block_k)
    s_TS = capped(plgpu.dot(q_TH, k_ref[keys, :], trans_b=True) * scale,
                  softcap)[0] * LOG2E
    if masked:
      s_TS = jnp.where(
          groups.visible(qpos_T1, positions(j * block_k, block_k, 1), frame),
          s_TS, MASK)
    return softmax_step(carry, s_TS, v_ref[keys, :])

  acc_TH, m_T, l_T = visit(
      key_blocks(groups, q0, block_q, block_k, frame), key_block,
      softmax_init(block_q, head_dim))
  o_ref[...] = (acc_TH / l_T[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m_T + jnp.log2(l_T)


def dq_kernel(scalars_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
              dq_ref, *, groups, block_k, softcap=None):
  """dQ of one query block of one head, its probabilities recomputed from
  the saved log-sum-exp over the same key blocks as the forward."""
  block_q, head_dim = q_ref.shape
  frame = groups.frame(scalars_ref, pl.program_id(2))
  q0 = frame.q_start + pl.program_id(0) * block_q
  q_TH, do_TH = q_ref[...], do_ref[...]
  lse_T, delta_T = lse_ref[...], delta_ref[...]
  qpos_T1 = positions(q0, block_q, 0)
  scale = head_dim ** -0.5

  def key_block(j, dq_TH, masked):
    keys = pl.ds(j * block_k, block_k)
    k_SH = k_ref[keys, :]
    s_TS, slope_TS = capped(plgpu.dot(q_TH, k_SH, trans_b=True) * scale,
                            softcap)
    s_TS = s_TS * LOG2E
    if masked:
      s_TS = jnp.where(
          groups.visible(qpos_T1, positions(j * block_k, block_k, 1), frame),
          s_TS, MASK)
    p_TS = jnp.exp2(s_TS - lse_T[:, None])
    dp_TS = plgpu.dot(do_TH, v_ref[keys, :], trans_b=True)
    ds_TS = p_TS * (dp_TS - delta_T[:, None])
    if softcap:
      ds_TS = ds_TS * slope_TS
    return dq_TH + plgpu.dot(ds_TS.astype(k_SH.dtype), k_SH)

  dq_TH = visit(key_blocks(groups, q0, block_q, block_k, frame),
                 key_block, jnp.zeros((block_q, head_dim), jnp.float32))
  dq_ref[...] = (dq_TH * scale).astype(dq_ref.dtype)


def dkv_kernel(scalars_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               dk_ref, dv_ref, *, groups, block_q, softcap=None):
  """dK and dV of one key block of one kv head, over the query heads that
  read it and the query blocks that see it. Key-major: the tiles are [key,
  query] (P^T, dP^T, dS^T), so that both accumulating products take their
  operands as stored and no register tile is transposed."""
  block_k, head_dim = k_ref.shape
  queries, Q = q_ref.shape[:2]
  k0 = pl.program_id(0) * block_k
  first_head = pl.program_id(2) * Q
  k_SH, v_SH = k_ref[...], v_ref[...]
  kpos_S1 = positions(k0, block_k, 0)
  scale = head_dim ** -0.5

  def query_head(r, carry):
    frame = groups.frame(scalars_ref, first_head + r)

    def query_block(i, carry, masked):
      dk_SH, dv_SH = carry
      queries = pl.ds(i * block_q, block_q)
      q_TH, do_TH = q_ref[queries, r, :], do_ref[queries, r, :]
      s_ST, slope_ST = capped(plgpu.dot(k_SH, q_TH, trans_b=True) * scale,
                              softcap)
      s_ST = s_ST * LOG2E
      if masked:
        s_ST = jnp.where(
            groups.visible(positions(frame.q_start + i * block_q, block_q, 1),
                           kpos_S1, frame),
            s_ST, MASK)
      p_ST = jnp.exp2(s_ST - lse_ref[r, queries][None, :])
      dv_SH += plgpu.dot(p_ST.astype(do_TH.dtype), do_TH)
      dp_ST = plgpu.dot(v_SH, do_TH, trans_b=True)
      ds_ST = p_ST * (dp_ST - delta_ref[r, queries][None, :])
      if softcap:
        ds_ST = ds_ST * slope_ST
      dk_SH += plgpu.dot(ds_ST.astype(q_TH.dtype), q_TH)
      return dk_SH, dv_SH

    return visit(query_blocks(groups, k0, block_k, block_q, frame, queries),
                  query_block, carry)

  zeros = jnp.zeros((block_k, head_dim), jnp.float32)
  dk_SH, dv_SH = lax.fori_loop(0, Q, query_head, (zeros, zeros))
  dk_ref[...] = (dk_SH * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_SH.astype(dv_ref.dtype)
