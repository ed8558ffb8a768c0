"""Key/value cache for generation, and attention of new tokens over it.

The cache holds every layer's keys and values, `[layers, batch, length,
kv_heads, head_dim]` (kv heads only under GQA). Its length is fixed when it
is made, so prefill chunks and decode steps keep fixed shapes and compile
once.
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from longlora_jax.config import LlamaConfig
from longlora_jax.sharding import BATCH_AXES, batch_parallelism

CACHE_BLOCK = 512  # Key block of the attention loop; cache lengths are multiples.


def init_cache(config: LlamaConfig, batch: int, length: int, dtype=jnp.bfloat16,
               mesh=None):
  """An empty cache for `length` positions (rounded up to CACHE_BLOCK); on
  `mesh`, its rows split over the batch axes and its kv heads over the
  tensor axis, where they divide."""
  length = -(-length // CACHE_BLOCK) * CACHE_BLOCK
  shape = (config.num_hidden_layers, batch, length,
           config.num_key_value_heads, config.head_dim)
  sharding = None
  if mesh is not None:
    rows = BATCH_AXES if batch % batch_parallelism(mesh) == 0 else None
    heads = ("tensor" if config.num_key_value_heads % mesh.shape["tensor"] == 0
             else None)
    sharding = NamedSharding(mesh, P(None, rows, None, heads, None))
  zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
  return {"k": zeros(), "v": zeros()}


def cached_attention(q_BCNH, k_LBSKH, v_LBSKH, layer, start, *,
                     block: int = CACHE_BLOCK):
  """Causal attention of C new queries at positions start..start+C-1 over
  layer `layer` of the stacked cache.

  Keys at positions <= each query's are read from the cache in blocks with
  an online softmax (float32), and the loop stops at the last block any
  query can see, so a prefill chunk or a decode step costs O(start + C),
  whatever the cache length, and no [C, length] score matrix is made. The
  blocks are sliced from the stacked cache itself: slicing the layer out
  first would copy all of its allocated length at every step.
  """
  B, C, N, H = q_BCNH.shape
  S, K = k_LBSKH.shape[2], k_LBSKH.shape[3]
  Q = N // K
  q_BKQCH = (q_BCNH.reshape(B, C, K, Q, H).transpose(0, 2, 3, 1, 4)
             .astype(jnp.float32) * (H ** -0.5))
  q_pos_C = start + jnp.arange(C)

  def body(i, carry):
    m_BKQC, l_BKQC, acc_BKQCH = carry
    at, size = (layer, 0, i * block, 0, 0), (1, B, block, K, H)
    k_blk = jax.lax.dynamic_slice(k_LBSKH, at, size)[0]
    v_blk = jax.lax.dynamic_slice(v_LBSKH, at, size)[0]
    s_BKQCS = jnp.einsum("BKQCH,BSKH->BKQCS", q_BKQCH, k_blk.astype(jnp.float32))
    k_pos_S = i * block + jnp.arange(block)
    s_BKQCS = jnp.where(k_pos_S[None, :] <= q_pos_C[:, None], s_BKQCS, -jnp.inf)
    # Block 0 always holds key 0, visible to every query, so m is finite
    # after it and fully masked later blocks add exactly zero.
    m_new = jnp.maximum(m_BKQC, s_BKQCS.max(-1))
    p_BKQCS = jnp.exp(s_BKQCS - m_new[..., None])
    corr = jnp.exp(m_BKQC - m_new)
    l_BKQC = l_BKQC * corr + p_BKQCS.sum(-1)
    acc_BKQCH = acc_BKQCH * corr[..., None] + jnp.einsum(
        "BKQCS,BSKH->BKQCH", p_BKQCS, v_blk.astype(jnp.float32))
    return m_new, l_BKQC, acc_BKQCH

  init = (jnp.full((B, K, Q, C), -jnp.inf), jnp.zeros((B, K, Q, C)),
          jnp.zeros((B, K, Q, C, H)))
  n_blocks = jnp.minimum((start + C + block - 1) // block, S // block)
  _, l_BKQC, acc_BKQCH = jax.lax.fori_loop(0, n_blocks, body, init)
  out_BKQCH = acc_BKQCH / l_BKQC[..., None]
  return out_BKQCH.transpose(0, 3, 1, 2, 4).reshape(B, C, N, H).astype(
      q_BCNH.dtype)
