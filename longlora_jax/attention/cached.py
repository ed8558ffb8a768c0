"""Attention of new tokens over the stacked KV cache (generation), by blocks
in pure JAX, and the split that runs a kernel on each device's part.

The cache (`model.kv_cache`) holds every layer's keys, `[layers, batch,
kv_heads, head_dim, length]`, and values, `[layers, batch, kv_heads, length,
head_dim]`, its length a multiple of `CACHE_BLOCK`.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from longlora_jax.attention.masks import attention_mask, soft_cap
from longlora_jax.parallel.sharding import BATCH_AXES, batch_parallelism

CACHE_BLOCK = 512  # Key block of the loop; cache lengths are multiples.


def chunked_cached_attention(q_BCNH, k_LBKHS, v_LBKSH, layer, start, *,
                             block: int = CACHE_BLOCK, window=None,
                             softcap: float | None = None):
  """Causal attention of C new queries at positions start..start+C-1 over
  layer `layer` of the stacked cache, their own keys already written.
  `window`: a sliding window (`masks.attention_mask`; an int or, for a
  layer chosen inside the scan, a traced one), None for none. `softcap`:
  scores soft-capped, cap * tanh(s / cap) (Gemma 2).

  Keys at positions <= each query's are read from the cache in blocks with
  an online softmax (float32), and the loop stops at the last block any
  query can see, so a prefill chunk or a decode step costs O(start + C),
  whatever the cache length, and no [C, length] score matrix is made. The
  blocks are sliced from the stacked cache itself: slicing the layer out
  first would copy all of its allocated length at every step.
  """
  B, C, N, H = q_BCNH.shape
  K, S = v_LBKSH.shape[2], v_LBKSH.shape[3]
  Q = N // K
  q_BKQCH = (q_BCNH.reshape(B, C, K, Q, H).transpose(0, 2, 3, 1, 4)
             .astype(jnp.float32) * (H ** -0.5))
  q_pos_C = start + jnp.arange(C)
  if Q * C == 1:
    # One query per kv head (decoding without GQA): XLA:GPU would turn the
    # matrix-vector products into reductions over the cache's minor axis
    # and re-lay out the whole cache for them, a copy of all of it at every
    # step. The query twice keeps them matrix products; the cache is read
    # once all the same.
    q_BKQCH = jnp.concatenate([q_BKQCH, q_BKQCH], axis=3)
    q_pos_C = jnp.concatenate([q_pos_C, q_pos_C])

  def body(i, carry):
    m_BKQC, l_BKQC, acc_BKQCH = carry
    k_BKHS = jax.lax.dynamic_slice(k_LBKHS, (layer, 0, 0, 0, i * block),
                                   (1, B, K, H, block))[0]
    v_BKSH = jax.lax.dynamic_slice(v_LBKSH, (layer, 0, 0, i * block, 0),
                                   (1, B, K, block, H))[0]
    s_BKQCS = jnp.einsum("BKQCH,BKHS->BKQCS", q_BKQCH,
                         k_BKHS.astype(jnp.float32))
    s_BKQCS = soft_cap(s_BKQCS, softcap)
    k_pos_S = i * block + jnp.arange(block)
    mask_CS = attention_mask(q_pos_C, k_pos_S, window=window)[0]
    s_BKQCS = jnp.where(mask_CS, s_BKQCS, -jnp.inf)
    # A row that has seen no key yet (a window starting past this block)
    # keeps m = -inf; shifting it by 0 makes its weights 0, not NaN.
    m_new = jnp.maximum(m_BKQC, s_BKQCS.max(-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p_BKQCS = jnp.exp(s_BKQCS - m_safe[..., None])
    corr = jnp.exp(m_BKQC - m_safe)
    l_BKQC = l_BKQC * corr + p_BKQCS.sum(-1)
    acc_BKQCH = acc_BKQCH * corr[..., None] + jnp.einsum(
        "BKQCS,BKSH->BKQCH", p_BKQCS, v_BKSH.astype(jnp.float32))
    return m_new, l_BKQC, acc_BKQCH

  rows = q_BKQCH.shape[3]
  init = (jnp.full((B, K, Q, rows), -jnp.inf), jnp.zeros((B, K, Q, rows)),
          jnp.zeros((B, K, Q, rows, H)))
  n_blocks = jnp.minimum((start + C + block - 1) // block, S // block)
  # Blocks wholly before the first query's window hold no visible key.
  first = 0 if window is None else jnp.maximum(0, (start - window + 1) // block)
  _, l_BKQC, acc_BKQCH = jax.lax.fori_loop(first, n_blocks, body, init)
  out_BKQCH = (acc_BKQCH / l_BKQC[..., None])[:, :, :, :C]
  return out_BKQCH.transpose(0, 3, 1, 2, 4).reshape(B, C, N, H).astype(
      q_BCNH.dtype)


def cache_axes(batch: int, kv_heads: int, mesh) -> tuple:
  """The mesh axes a cache's rows and kv heads split over, where they
  divide (None: whole on every device)."""
  rows = BATCH_AXES if batch % batch_parallelism(mesh) == 0 else None
  heads = "tensor" if kv_heads % mesh.shape["tensor"] == 0 else None
  return rows, heads


def on_each_device(attend):
  """`attend` on each device's rows and kv heads of the context mesh
  (`jax.set_mesh`, as `generate` runs): a kernel is a custom call without a
  partitioning rule, for which GSPMD would gather the whole cache onto
  every device. Query heads follow their kv heads (head n reads n // Q)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return attend

  def split(q_BCNH, k_LBKHS, v_LBKSH, layer, start):
    rows, heads = cache_axes(q_BCNH.shape[0], k_LBKHS.shape[2], mesh)
    cache, queries = P(None, rows, heads, None, None), P(rows, None, heads)
    return jax.shard_map(attend, mesh=mesh,
                         in_specs=(queries, cache, cache, P(), P()),
                         out_specs=queries, check_vma=False)(
                             q_BCNH, k_LBKHS, v_LBKSH, layer, start)
  return split
