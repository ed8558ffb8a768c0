"""New tokens over the stacked KV cache in pure JAX: the blocked loop against
float64 attention, and the mesh axes a cache splits over."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax.attention.cached import (CACHE_BLOCK, cache_axes,
                                           chunked_cached_attention,
                                           on_each_device)
from longlora_jax.parallel.sharding import BATCH_AXES, make_mesh


def _attention_reference(q, k, v, start):
  """Float64 softmax attention, query i at position start+i sees keys <= it."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, C, N, H = q.shape
  K = k.shape[2]
  out = np.zeros_like(q)
  for b in range(B):
    for n in range(N):
      kv = n // (N // K)
      for i in range(C):
        visible = start + i + 1
        s = k[b, :visible, kv] @ q[b, i, n] / np.sqrt(H)
        p = np.exp(s - s.max())
        out[b, i, n] = (p / p.sum()) @ v[b, :visible, kv]
  return out


@pytest.mark.parametrize("start,chunk", [(0, 1), (0, 70), (5, 1), (500, 30),
                                         (1000, 24)])
def test_matches_float64(start, chunk):
  rng = np.random.default_rng(start)
  S = 2 * CACHE_BLOCK
  q = rng.normal(size=(2, chunk, 6, 16)).astype(np.float32)
  k = rng.normal(size=(2, S, 2, 16)).astype(np.float32)
  v = rng.normal(size=(2, S, 2, 16)).astype(np.float32)
  # Garbage beyond what the queries may see must not matter.
  k[:, start + chunk:] = 1e4
  # Layer 1 of a stacked cache whose other layers are garbage.
  stack = lambda x, axes: jnp.asarray(np.stack([x + 1e3, x, x - 1e3]
                                               ).transpose(axes))
  got = chunked_cached_attention(jnp.asarray(q), stack(k, (0, 1, 3, 4, 2)),
                                 stack(v, (0, 1, 3, 2, 4)), 1, start)
  np.testing.assert_allclose(got, _attention_reference(q, k, v, start),
                             atol=2e-5)


@pytest.mark.parametrize("start", [0, 300, 1023])
def test_one_query_per_kv_head_in_small_blocks(start):
  # Decoding without GQA (the query doubled inside), blocks of 128: the loop
  # stops at the block that holds `start`.
  rng = np.random.default_rng(7)
  S = 2 * CACHE_BLOCK
  q = rng.normal(size=(1, 1, 2, 8)).astype(np.float32)
  k, v = (rng.normal(size=(1, S, 2, 8)).astype(np.float32) for _ in range(2))
  k[:, start + 1:] = 1e4
  got = chunked_cached_attention(
      jnp.asarray(q), jnp.asarray(k.transpose(0, 2, 3, 1))[None],
      jnp.asarray(v.transpose(0, 2, 1, 3))[None], 0, start, block=128)
  np.testing.assert_allclose(got, _attention_reference(q, k, v, start),
                             atol=2e-5)


def test_cache_axes_split_where_they_divide():
  mesh = make_mesh("fsdp=2,tensor=4")
  assert cache_axes(4, 8, mesh) == (BATCH_AXES, "tensor")
  assert cache_axes(3, 8, mesh) == (None, "tensor")
  assert cache_axes(4, 2, mesh) == (BATCH_AXES, None)


def test_on_each_device_without_a_mesh_is_the_function_itself():
  attend = lambda *args: args
  assert on_each_device(attend) is attend
  with jax.set_mesh(make_mesh("fsdp=1", jax.devices()[:1])):
    assert on_each_device(attend) is attend
