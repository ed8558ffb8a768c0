import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax import LlamaConfig, forward, init_params
from longlora_jax.pallas_s2 import pallas_causal_attention
from longlora_jax.attention import (ATTENTION_FNS, attention_flops,
                                    causal_attention, get_attention)
from longlora_jax.chunked_attention import chunked_causal_attention
from longlora_jax.s2_attention import s2_attention
from tests import attention_reference as ref


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("shape", [(1, 12, 4, 4), (3, 20, 6, 2)], ids=str)
def test_causal_attention_matches_reference(shape, segments, dtype):
  B, T, N, K = shape
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(x, dtype) for x in ref.random_qkv(rng, B, T, N, K, 8))
  w = jnp.asarray(rng.standard_normal((B, T, N, 8)), jnp.float32)
  seg = jnp.asarray(ref.random_segments(rng, B, T)) if segments else None
  out, grads = ref.value_and_grads(causal_attention, (), q, k, v, w, seg)
  mask = ref.mask_from_keys([ref.causal_keys(T)] * N, seg, B)
  want, want_grads = ref.attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                   v.astype(jnp.float32), mask, w)
  tol = dict(atol=1e-5) if dtype == jnp.float32 else dict(relative=2e-2)
  ref.assert_close(out, want, **tol)
  tol = dict(atol=1e-4) if dtype == jnp.float32 else dict(relative=2e-2)
  for got_g, want_g in zip(grads, want_grads):
    ref.assert_close(got_g, want_g, **tol)


def test_registry():
  assert ATTENTION_FNS == {"full": causal_attention,
                           "chunked": chunked_causal_attention,
                           "s2": s2_attention,
                           "pallas": pallas_causal_attention}
  for name, fn in ATTENTION_FNS.items():
    assert get_attention(name) is fn
  custom = functools.partial(s2_attention, variant="roll")
  assert get_attention(custom) is custom
  with pytest.raises(ValueError, match="unknown attention 'dense'"):
    get_attention("dense")


def test_attention_flops_by_hand():
  # seq 16, 2 heads of 4: QK^T and PV cost 2 * 4 FLOPs each per kept pair.
  per_pair = 2 * 2 * 4
  # Causal: 1 + 2 + ... + 16 = 136 pairs per head.
  assert attention_flops(16, 2, 4) == 2 * 136 * per_pair == 4352
  assert attention_flops(16, 2, 4, batch=3) == 3 * 4352
  # Backward: dV, dP, dQ, dK, twice the forward; forward + backward = 3x.
  assert attention_flops(16, 2, 4, backward=True) == 3 * 4352
  # S², G = 4. Unshifted head: 4 groups of 4, 10 pairs each = 40.
  # Shifted, "flash": groups 2, 4, 4, 4, 2 = 3 + 30 + 3 = 36.
  # Shifted, "roll": 4 groups of 4 = 40.
  assert attention_flops(16, 2, 4, group_size=4) == (40 + 36) * per_pair
  assert attention_flops(16, 2, 4, group_size=4, variant="roll") == (
      80 * per_pair)
  assert attention_flops(16, 4, 4, group_size=4, backward=True) == (
      3 * 2 * 76 * per_pair)
  # Llama-2 7B at 8k, G = 2k: 16 heads with 4 groups, 16 with 3 groups and
  # two of 1k; about (4 + 3 + 2 / 4) / 2 / 16 of the 8k causal square.
  full = attention_flops(8192, 32, 128)
  assert full == 32 * 8192 * 8193 / 2 * 4 * 128
  s2 = attention_flops(8192, 32, 128, group_size=2048)
  assert s2 == 16 * (7 * 2048 * 2049 / 2 + 2 * 1024 * 1025 / 2) * 4 * 128
  assert s2 / full == pytest.approx(7.5 / 32, rel=1e-3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(group_size=6), "seq=16, group_size=6"),
    (dict(group_size=4, num_heads=3), "q_heads=3 is odd"),
    (dict(group_size=4, variant="shift"), "unknown S²-Attn variant"),
])
def test_attention_flops_value_errors(kwargs, message):
  args = dict(seq=16, num_heads=2, head_dim=4) | kwargs
  with pytest.raises(ValueError, match=message):
    attention_flops(args.pop("seq"), args.pop("num_heads"),
                    args.pop("head_dim"), **args)


_logits = jax.jit(forward, static_argnums=0,
                  static_argnames=("attention",))


def test_model_runs_with_each_attention():
  config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, initializer_range=0.3)
  params = init_params(config, jax.random.key(0))
  rng = np.random.default_rng(6)
  ids = jnp.asarray(rng.integers(0, 64, (2, 32)))
  seg = jnp.asarray(ref.random_segments(rng, 2, 32))
  logits = {name: np.asarray(_logits(config, params, ids, attention=name))
            for name in ATTENTION_FNS if name != "pallas"}  # pallas: GPU only
  full = logits["full"]
  assert np.abs(full).std() > 0.3  # large enough for 1e-4 to matter
  np.testing.assert_allclose(logits["chunked"], full, atol=1e-4, rtol=0)
  with_seg = [_logits(config, params, ids, attention=name, segment_ids_BT=seg)
              for name in ("full", "chunked")]
  np.testing.assert_allclose(with_seg[1], with_seg[0], atol=1e-4, rtol=0)
  # S², default groups of 8: the first G/2 = 4 tokens see the same keys as
  # with full attention in every head; tokens past the first group do not.
  np.testing.assert_allclose(logits["s2"][:, :4], full[:, :4], atol=1e-5)
  assert np.abs(logits["s2"][:, 8:] - full[:, 8:]).max() > 1e-2
  # Options through a callable.
  roll = functools.partial(s2_attention, variant="roll", group_size=16,
                           implementation="chunked", block_size=4)
  assert np.isfinite(_logits(config, params, ids, attention=roll)).all()
