"""Text generation with a KV cache: chunked prefill, then token-by-token decode.

Shapes are fixed per (batch, cache length, chunk), so a long prompt compiles
the prefill step once and decoding compiles once, never per token.
"""

import contextlib
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from longlora_jax.model.config import LlamaConfig
from longlora_jax.model.kv_cache import cache_sharding, init_cache
from longlora_jax.model.llama import extend_cache, init_params, lm_head
from longlora_jax.parallel.sharding import shardings_like

_MIN_CHUNK = 64


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _extend(config: LlamaConfig, params, cache, ids_BC, start, last):
  """Appends a chunk to the cache; float32 logits `[batch, vocab]` of the
  chunk's position `last`."""
  h_BCD, cache = extend_cache(config, params, ids_BC, cache, start)
  h_B1D = jax.lax.dynamic_slice_in_dim(h_BCD, last, 1, axis=1)
  return lm_head(config, params, h_B1D)[:, 0], cache


@functools.partial(jax.jit, static_argnames=("greedy",))
def _sample(logits_BV, key, temperature, top_p, *, greedy: bool):
  if greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  # Nucleus: keep the smallest set of tokens whose probability reaches top_p.
  order_BV = jnp.argsort(-logits_BV, axis=-1)
  sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  sorted_BV = jnp.where(before_BV < top_p, sorted_BV, -jnp.inf)
  choice_B = jax.random.categorical(key, sorted_BV, axis=-1)
  return jnp.take_along_axis(order_BV, choice_B[:, None], axis=-1)[:, 0].astype(
      jnp.int32)


def _chunk_size(prompt_len: int, max_chunk: int) -> int:
  """A power of two (>= 64) covering the prompt, at most `max_chunk`."""
  size = _MIN_CHUNK
  while size < min(prompt_len, max_chunk):
    size *= 2
  return min(size, max(max_chunk, _MIN_CHUNK))


def generate(config: LlamaConfig, params, input_ids, *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0,
             eos_token_id: int | tuple[int, ...] | None = -1,
             key: jax.Array | None = None, chunk_size: int = 2048,
             cache_dtype=None,
             on_token: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
  """Continues equal-length prompts; returns the new tokens `[batch, n]`.

  Args:
    input_ids: `[batch, prompt]` token ids (no padding).
    temperature: 0 for greedy decoding, else sampling at this temperature
      with nucleus `top_p`.
    eos_token_id: stop a row at this token (or any of these); default the
      config's; None never stops early. Rows that stopped repeat their EOS
      until every row has stopped.
    chunk_size: prompt tokens per prefill step; the attention over the cache
      never builds a [prompt, prompt] matrix, so 100k-token prompts fit.
    cache_dtype: default the parameters' dtype.
    on_token: called with each new `[batch]` token array (for streaming).
  """
  ids = np.asarray(input_ids, np.int32)
  B, P = ids.shape
  if P < 1 or max_new_tokens < 1:
    raise ValueError("generate needs a non-empty prompt and max_new_tokens >= 1")
  if eos_token_id == -1:
    eos_token_id = config.eos_token_id
  eos = np.atleast_1d(np.asarray(eos_token_id if eos_token_id is not None
                                 else [], np.int32))
  chunk = _chunk_size(P, chunk_size)
  n_chunks = -(-P // chunk)
  padded = np.zeros((B, n_chunks * chunk), np.int32)
  padded[:, :P] = ids
  embedding = params["embed_tokens"]["embedding"]
  # Weights sharded over a mesh: the cache is sharded over it too.
  mesh = getattr(embedding.sharding, "mesh", None)
  cache = init_cache(config, B, max(P + max_new_tokens, n_chunks * chunk),
                     cache_dtype or embedding.dtype, mesh)
  # Under the weights' mesh: kernels split their work over it
  # (attention.cached).
  with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
    # Padding written past the prompt is never attended: decode overwrites
    # each position before any query can see it.
    for c in range(n_chunks):
      logits, cache = _extend(config, params, cache,
                              jnp.asarray(padded[:, c * chunk:(c + 1) * chunk]),
                              c * chunk,
                              (P - 1) - c * chunk if c == n_chunks - 1 else 0)
    key = key if key is not None else jax.random.key(0)
    greedy = temperature == 0
    out = []
    done = np.zeros(B, bool)
    for t in range(max_new_tokens):
      key, sub = jax.random.split(key)
      token = np.asarray(_sample(logits, sub, temperature, top_p,
                                 greedy=greedy))
      token = np.where(done, out[-1] if out else token, token)
      out.append(token)
      if on_token is not None:
        on_token(token)
      done |= np.isin(token, eos)
      if done.all() or t == max_new_tokens - 1:
        break
      logits, cache = _extend(config, params, cache,
                              jnp.asarray(token[:, None]), P + t, 0)
    return np.stack(out, axis=1)


def lower_extend(config: LlamaConfig, mesh, *, ctx: int, chunk: int = 2048,
                 batch: int = 1, dtype=jnp.bfloat16, decode: bool = False):
  """The last step of generating at `ctx` tokens for `batch` prompts,
  lowered for `mesh` against abstract arrays: the last prefill step
  (`chunk` queries, as `generate` rounds it) or, with `decode`, one decode
  step (one query), over a cache of `ctx` positions. Weights are split by
  the parameter rules and the cache as `generate` lays it out
  (`kv_cache.cache_sharding`; there is no context-parallel axis to split
  its length)."""
  abstract = lambda tree, shardings: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
      shardings)
  params = jax.eval_shape(lambda k: init_params(config, k, dtype=dtype),
                          jax.random.key(0))
  cache = jax.eval_shape(lambda: init_cache(config, batch, ctx, dtype))
  sharding = cache_sharding(config, batch, mesh)
  chunk = 1 if decode else _chunk_size(ctx, chunk)
  ids = jax.ShapeDtypeStruct((batch, chunk), jnp.int32,
                             sharding=NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    return _extend.lower(
        config, abstract(params, shardings_like(params, mesh)),
        abstract(cache, jax.tree.map(lambda _: sharding, cache)), ids,
        ctx - chunk, chunk - 1)
