"""The prefill-over-cache kernel: through the Pallas interpreter against
float64 attention, and compiled for a GPU that is not here."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax.perf import gpu_target
from longlora_jax.attention.dispatch import cached_attention
from longlora_jax.attention.pallas.cached import (BLOCK_Q,
                                                  pallas_cached_attention,
                                                  takes)
from tests.references import attention as ref


def _stacked(k, v, layer, layers=3):
  """A `[L, B, K, H, S]` / `[L, B, K, S, H]` cache holding k, v at `layer`
  and garbage in the other layers."""
  stack = lambda x: np.stack([x if i == layer else x + 1e3 * (i + 1)
                              for i in range(layers)])
  return (jnp.asarray(stack(k).transpose(0, 1, 3, 4, 2)),
          jnp.asarray(stack(v).transpose(0, 1, 3, 2, 4)))


@pytest.mark.parametrize("start", [0, 37, 64, 448])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2)])
def test_matches_float64_attention(start, heads, kv_heads):
  rng = np.random.default_rng(start + heads)
  S, C, H = 1024, 2 * BLOCK_Q, 64
  q, k, v = (x.astype(np.float32) for x in ref.random_qkv(
      rng, 2, S, heads, kv_heads, H))
  end = start + C
  # Keys past the chunk are garbage no query may see.
  k[:, end:] = 1e4
  keys_k, keys_v = _stacked(k, v, layer=1)
  got = pallas_cached_attention(jnp.asarray(q[:, start:end]), keys_k, keys_v,
                                1, start, interpret=True)
  mask = ref.mask_from_keys([ref.causal_keys(end)] * heads, batch=2)
  want = ref.attention(q[:, :end], k[:, :end], v[:, :end], mask)[:, start:]
  ref.assert_close(got, want, relative=2e-6)
  # And the chunked loop it replaces on a GPU.
  loop = cached_attention(jnp.asarray(q[:, start:end]), keys_k, keys_v, 1,
                          start, implementation="chunked")
  ref.assert_close(got, loop, relative=2e-6)


def test_bfloat16_matches_float64():
  rng = np.random.default_rng(0)
  S, start, C = 512, 200, BLOCK_Q
  q, k, v = (x.astype(np.float32) for x in ref.random_qkv(rng, 1, S, 4, 4,
                                                          128))
  as_bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
  q, k, v = as_bf16(q), as_bf16(k), as_bf16(v)
  keys_k, keys_v = (x.astype(jnp.bfloat16) for x in _stacked(k, v, 0, 1))
  got = pallas_cached_attention(jnp.asarray(q[:, start:start + C],
                                            jnp.bfloat16),
                                keys_k, keys_v, 0, start, interpret=True)
  assert got.dtype == jnp.bfloat16
  end = start + C
  mask = ref.mask_from_keys([ref.causal_keys(end)] * 4)
  want = ref.attention(q[:, :end], k[:, :end], v[:, :end], mask)[:, start:]
  ref.assert_close(got, want, relative=2e-2)


def test_takes_and_refuses():
  q = lambda C, H: jax.ShapeDtypeStruct((1, C, 4, H), jnp.bfloat16)
  assert takes(q(2048, 128), 100352)
  assert not takes(q(1, 128), 100352)  # decoding stays on the chunked loop
  assert not takes(q(2048, 96), 100352)  # head_dim the kernel has no tile for
  assert not takes(q(2048, 128), 1000)
  cache_k = jnp.zeros((1, 1, 4, 96, 512))
  cache_v = jnp.zeros((1, 1, 4, 512, 96))
  with pytest.raises(ValueError, match="head_dim in"):
    pallas_cached_attention(jnp.zeros((1, 64, 4, 96)), cache_k, cache_v, 0, 0,
                            interpret=True)
  with pytest.raises(ValueError, match="unknown cached attention"):
    cached_attention(jnp.zeros((1, 64, 4, 96)), cache_k, cache_v, 0, 0,
                     implementation="cudnn")


def test_compiles_for_an_h100_reading_the_cache_in_place(tmp_path):
  # Llama-2 7B at 100k: the last 2048-token prefill chunk over a 100,352-
  # position cache, compiled to PTX for sm_90a with no GPU here. The cache
  # (2 x 24.5 GiB) is read where it lies: the step's temporaries are bytes.
  if not gpu_target.AVAILABLE:
    pytest.skip("needs JAX's CUDA plugin (requirements-test.txt)")
  devices = gpu_target.devices("h100", 1)
  on = jax.sharding.SingleDeviceSharding(devices[0])
  S = 100352
  shapes = [((1, 2048, 32, 128), jnp.bfloat16), ((32, 1, 32, 128, S),
                                                   jnp.bfloat16),
            ((32, 1, 32, S, 128), jnp.bfloat16), ((), jnp.int32),
            ((), jnp.int32)]
  args = [jax.ShapeDtypeStruct(s, d, sharding=on) for s, d in shapes]
  compiled, kernels = gpu_target.compile_to_ptx(pallas_cached_attention, args,
                                                devices, tmp_path)
  assert compiled.memory_analysis().temp_size_in_bytes < 2**20
  assert re.search(r"^\.target sm_90a\b", kernels["cached_attention"], re.M)
  assert "wgmma.mma_async" in kernels["cached_attention"]


def test_each_device_runs_its_rows_and_kv_heads_under_a_mesh():
  # As `generate` runs on a mesh: the kernel is a custom call with no
  # partitioning rule, so it runs per device on the cache's own split
  # (rows over fsdp, kv heads over tensor), nothing of the cache gathered.
  from jax.sharding import NamedSharding, PartitionSpec as P
  from longlora_jax.parallel.sharding import BATCH_AXES, make_mesh
  mesh = make_mesh("fsdp=2,tensor=2", jax.devices()[:4])
  rng = np.random.default_rng(1)
  S, start, C = 512, 130, BLOCK_Q
  q, k, v = (x.astype(np.float32) for x in ref.random_qkv(rng, 2, S, 4, 2,
                                                          64))
  keys_k, keys_v = _stacked(k, v, layer=0, layers=2)
  split = NamedSharding(mesh, P(None, BATCH_AXES, "tensor"))
  keys_k, keys_v = jax.device_put((keys_k, keys_v), split)
  queries = jax.device_put(jnp.asarray(q[:, start:start + C]),
                           NamedSharding(mesh, P(BATCH_AXES, None, "tensor")))
  attend = jax.jit(lambda q, k, v: cached_attention(
      q, k, v, 0, start, implementation="pallas_interpret"))
  with jax.set_mesh(mesh):
    got = attend(queries, keys_k, keys_v)
    hlo = attend.lower(queries, keys_k, keys_v).compile().as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  end = start + C
  mask = ref.mask_from_keys([ref.causal_keys(end)] * 4, batch=2)
  want = ref.attention(q[:, :end], k[:, :end], v[:, :end], mask)[:, start:]
  ref.assert_close(got, want, relative=2e-6)
