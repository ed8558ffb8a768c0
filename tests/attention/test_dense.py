import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax.attention.dense import dense_causal_attention
from tests.references import attention as ref


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("shape", [(1, 12, 4, 4), (3, 20, 6, 2)], ids=str)
def test_causal_attention_matches_reference(shape, segments, dtype):
  B, T, N, K = shape
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(x, dtype) for x in ref.random_qkv(rng, B, T, N, K, 8))
  w = jnp.asarray(rng.standard_normal((B, T, N, 8)), jnp.float32)
  seg = jnp.asarray(ref.random_segments(rng, B, T)) if segments else None
  out, grads = ref.value_and_grads(dense_causal_attention, (), q, k, v, w, seg)
  mask = ref.mask_from_keys([ref.causal_keys(T)] * N, seg, B)
  want, want_grads = ref.attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                   v.astype(jnp.float32), mask, w)
  tol = dict(atol=1e-5) if dtype == jnp.float32 else dict(relative=2e-2)
  ref.assert_close(out, want, **tol)
  tol = dict(atol=1e-4) if dtype == jnp.float32 else dict(relative=2e-2)
  for got_g, want_g in zip(grads, want_grads):
    ref.assert_close(got_g, want_g, **tol)
