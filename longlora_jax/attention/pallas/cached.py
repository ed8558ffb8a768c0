"""A prefill chunk's attention over the stacked KV cache as one fused Pallas
(GPU Triton) kernel.

C new queries at positions start..start+C-1 attend causally to every key
cached before them and to each other (their own keys are already written).
cuDNN's causal mask is anchored at the first key, and `start` changes with
each chunk (a static window would compile once per chunk), so on NVIDIA GPUs
this kernel does what the chunked loop (`attention.cached`) does elsewhere:
each program takes one block of queries of one head, reads key and value
blocks straight from the stacked cache (keys `[L, B, K, H, S]` give q·kᵀ its
operand as stored, values `[L, B, K, S, H]` give p·v its), stops at the last
block its queries can see and masks only the blocks that cross the diagonal.
Cost O(C · (start + C)) whatever the cache's length; nothing of the cache is
copied. Forward only: generation needs no gradients.

Constraints (`takes`): head_dim in `flash.HEAD_DIMS`, a chunk of a
multiple of `BLOCK_Q` queries (`generate` rounds chunks to powers of two >=
64), a cache length that is a multiple of `BLOCK_K` (cache lengths are
multiples of `attention.cached.CACHE_BLOCK`). Decoding (one query) stays on
the chunked loop, which reads the cache once at the memory bandwidth
either way.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from longlora_jax.attention.pallas.blocks import positions, visit
from longlora_jax.attention.pallas.flash import (AVAILABLE, HEAD_DIMS, LOG2E,
                                                 MASK, pl, plgpu,
                                                 softmax_init, softmax_step)

BLOCK_Q = 64
BLOCK_K = 64


def takes(q_BCNH, cache_length: int) -> bool:
  """Whether the kernel runs these queries over a cache this long."""
  _, C, _, H = q_BCNH.shape
  return (AVAILABLE and H in HEAD_DIMS and C % BLOCK_Q == 0
          and cache_length % BLOCK_K == 0)


def pallas_cached_attention(q_BCNH, k_LBKHS, v_LBKSH, layer, start, *,
                            interpret: bool = False):
  """`cached.chunked_cached_attention` as one kernel (see the module
  docstring).

  Args:
    q_BCNH: `[batch, chunk, q_heads, head_dim]` queries, RoPE applied.
    k_LBKHS, v_LBKSH: the stacked cache (`model.kv_cache.init_cache`), the
      chunk's own keys and values already written at start..start+C-1.
    layer, start: int32 scalars (may be traced).
    interpret: run through the Pallas interpreter (any backend; for tests).
  Returns:
    `[batch, chunk, q_heads, head_dim]` in q's dtype.
  """
  B, C, N, H = q_BCNH.shape
  K, S = v_LBKSH.shape[2], v_LBKSH.shape[3]
  if not takes(q_BCNH, S):
    raise ValueError(
        f"the cached-attention kernel takes head_dim in {HEAD_DIMS}, chunks "
        f"of a multiple of {BLOCK_Q} queries and caches of a multiple of "
        f"{BLOCK_K} positions; got q {q_BCNH.shape}, cache length {S}")
  scalars = jnp.stack([jnp.asarray(layer, jnp.int32),
                       jnp.asarray(start, jnp.int32)])
  query_spec = pl.BlockSpec((None, BLOCK_Q, None, H),
                            lambda i, b, n: (b, i, n, 0))
  whole = lambda x: pl.BlockSpec(x.shape, lambda i, b, n: (0,) * x.ndim)
  eight = H >= 128 or jnp.dtype(q_BCNH.dtype).itemsize == 4
  return pl.pallas_call(
      functools.partial(_kernel, block_k=BLOCK_K, group=N // K),
      grid=(C // BLOCK_Q, B, N),
      in_specs=[whole(scalars), query_spec, whole(k_LBKHS), whole(v_LBKSH)],
      out_specs=query_spec,
      out_shape=jax.ShapeDtypeStruct(q_BCNH.shape, q_BCNH.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=8 if eight else 4,
                                           num_stages=2),
      interpret=interpret,
      name="cached_attention",
  )(scalars, q_BCNH, k_LBKHS, v_LBKSH)


def _kernel(scalars_ref, q_ref, k_ref, v_ref, o_ref, *, block_k, group):
  block_q, head_dim = q_ref.shape
  layer, start = scalars_ref[0], scalars_ref[1]
  b, kv = pl.program_id(1), lax.div(pl.program_id(2), group)
  q0 = start + pl.program_id(0) * block_q  # position of the block's first query
  q_TH = q_ref[...]
  qpos_T1 = positions(q0, block_q, 0)
  scale = head_dim ** -0.5 * LOG2E

  def key_block(j, carry, masked):
    keys = pl.ds(j * block_k, block_k)
    s_TS = plgpu.dot(q_TH, k_ref[layer, b, kv, :, keys]) * scale
    if masked:
      s_TS = jnp.where(positions(j * block_k, block_k, 1) <= qpos_T1, s_TS,
                       MASK)
    return softmax_step(carry, s_TS, v_ref[layer, b, kv, keys, :])

  # Blocks [0, a) lie wholly at or before the first query; [a, hi) cross
  # the diagonal (key 0 is always seen, so no row stays empty).
  a = lax.div(q0 + 1, block_k)
  hi = lax.div(q0 + block_q - 1, block_k) + 1
  acc_TH, _, l_T = visit((0, 0, a, hi, None), key_block,
                          softmax_init(block_q, head_dim))
  o_ref[...] = (acc_TH / l_T[:, None]).astype(o_ref.dtype)
