"""Key/value cache for generation: its layout, length and sharding.

The cache holds every layer's keys, `[layers, batch, kv_heads, head_dim,
length]`, and values, `[layers, batch, kv_heads, length, head_dim]` (kv
heads only under GQA): the layouts the two products of the attention take
(positions last for q·kᵀ), so XLA:GPU updates the cache where it lies
instead of re-laying out a copy of all of it at every step. Its length is
fixed when it is made, so prefill chunks and decode steps keep fixed shapes
and compile once. New tokens attend over it by `attention.dispatch.
cached_attention`.
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from longlora_jax.attention.cached import CACHE_BLOCK, cache_axes
from longlora_jax.model.config import LlamaConfig


def init_cache(config: LlamaConfig, batch: int, length: int, dtype=jnp.bfloat16,
               mesh=None):
  """An empty cache for `length` positions (rounded up to CACHE_BLOCK); on
  `mesh`, laid out by `cache_sharding`."""
  length = -(-length // CACHE_BLOCK) * CACHE_BLOCK
  L, K, H = (config.num_hidden_layers, config.num_key_value_heads,
             config.head_dim)
  shapes = {"k": (L, batch, K, H, length), "v": (L, batch, K, length, H)}
  sharding = None if mesh is None else cache_sharding(config, batch, mesh)
  return {name: jax.jit(lambda shape=shape: jnp.zeros(shape, dtype),
                        out_shardings=sharding)()
          for name, shape in shapes.items()}


def cache_sharding(config: LlamaConfig, batch: int, mesh) -> NamedSharding:
  """How a cache of `batch` rows lies on `mesh` (keys and values alike): its
  rows split over the batch axes and its kv heads over the tensor axis,
  where they divide."""
  rows, heads = cache_axes(batch, config.num_key_value_heads, mesh)
  return NamedSharding(mesh, P(None, rows, heads, None, None))
