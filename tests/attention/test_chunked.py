import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax.attention.dense import dense_causal_attention
from longlora_jax.attention.chunked import chunked_causal_attention
from tests.references import attention as ref

# batch, seq, q_heads, kv_heads, block
SHAPES = [
    (1, 64, 4, 4, 16),   # MHA, four blocks
    (2, 50, 4, 2, 16),   # GQA, blocks of 10 (a divisor of 50)
    (2, 37, 8, 1, 8),    # one kv head, seq padded to 40
    (3, 24, 4, 2, 64),   # block longer than seq: one block
]


def _inputs(shape, dtype, seed, segments=False):
  B, T, N, K, _ = shape
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(x, dtype)
             for x in ref.random_qkv(rng, B, T, N, K, 8))
  w = jnp.asarray(rng.standard_normal((B, T, N, 8)), jnp.float32)
  seg = jnp.asarray(ref.random_segments(rng, B, T)) if segments else None
  return q, k, v, w, seg


def _check(shape, dtype, seed=0, segments=False):
  B, T, N, _, block = shape
  q, k, v, w, seg = _inputs(shape, dtype, seed, segments)
  out, grads = ref.value_and_grads(chunked_causal_attention,
                                   (("block_size", block),), q, k, v, w, seg)
  full, full_grads = ref.value_and_grads(dense_causal_attention, (), q, k, v,
                                         w, seg)
  mask = ref.mask_from_keys([ref.causal_keys(T)] * N, seg, B)
  want, want_grads = ref.attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                   v.astype(jnp.float32), mask, w)
  assert out.dtype == dtype and out.shape == q.shape
  for got_g, g in zip(grads, (q, k, v)):
    assert got_g.dtype == dtype and got_g.shape == g.shape
  if dtype == jnp.float32:
    ref.assert_close(out, want, atol=1e-5)
    ref.assert_close(out, full, atol=1e-5)
    for got_g, full_g, want_g in zip(grads, full_grads, want_grads):
      ref.assert_close(got_g, want_g, atol=1e-4)
      ref.assert_close(got_g, full_g, atol=1e-4)
  else:
    ref.assert_close(out, want, relative=2e-2)
    for got_g, want_g in zip(grads, want_grads):
      ref.assert_close(got_g, want_g, relative=2e-2)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_equals_full_attention_float32(shape):
  _check(shape, jnp.float32)


@pytest.mark.parametrize("shape", SHAPES[1:3], ids=str)
def test_equals_full_attention_with_segments(shape):
  _check(shape, jnp.float32, seed=1, segments=True)


@pytest.mark.parametrize("shape", SHAPES[1:3], ids=str)
def test_matches_reference_bfloat16(shape):
  _check(shape, jnp.bfloat16, seed=2)


def _train_temp_bytes(attention_fn, seq):
  """XLA's temporary memory for forward + backward at one head of 16."""
  x = jax.ShapeDtypeStruct((1, seq, 1, 16), jnp.float32)
  grad = jax.grad(lambda q, k, v: attention_fn(q, k, v).sum(), (0, 1, 2))
  return jax.jit(grad).lower(x, x, x).compile().memory_analysis(
  ).temp_size_in_bytes


def test_no_seq_by_seq_tensor_in_forward_or_backward():
  seq = 4096
  square = seq * seq * 4  # one float32 score matrix
  # The measurement sees dense attention's scores...
  assert _train_temp_bytes(dense_causal_attention, seq) >= square
  # ...and the chunked path keeps nothing close to them.
  chunked = lambda q, k, v: chunked_causal_attention(q, k, v, block_size=128)
  assert _train_temp_bytes(chunked, seq) < square / 16


def test_value_errors():
  q = jnp.zeros((1, 8, 3, 4))
  with pytest.raises(ValueError, match="q_heads=3 is not a multiple of kv_heads=2"):
    chunked_causal_attention(q, q[:, :, :2], q[:, :, :2])
  with pytest.raises(ValueError, match="block_size=0"):
    chunked_causal_attention(q, q, q, block_size=0)


@pytest.mark.parametrize("window,segments", [(1, False), (7, True),
                                             (23, False)])
def test_sliding_window_matches_reference(window, segments):
  # Windows of one token, shorter and longer than a block (8; seq 37 padded
  # to 40), both paths against the float64 reference, values and grads.
  B, T, N, K, block = 2, 37, 4, 2, 8
  q, k, v, w, seg = _inputs((B, T, N, K, block), jnp.float32, 3, segments)
  mask = ref.mask_from_keys([ref.window_keys(T, window)] * N, seg, B)
  want, want_grads = ref.attention(q, k, v, mask, w)
  for fn, options in ((chunked_causal_attention, (("block_size", block),)),
                      (dense_causal_attention, ())):
    out, grads = ref.value_and_grads(fn, (*options, ("window", window)), q, k,
                                     v, w, seg)
    ref.assert_close(out, want, atol=1e-5)
    for got_g, want_g in zip(grads, want_grads):
      ref.assert_close(got_g, want_g, atol=1e-4)


def test_soft_cap_matches_reference_in_both_paths():
  # Gemma 2's cap * tanh(s / cap), small enough to bite, with a window and
  # documents: values and gradients against float64.
  B, T, N, K, block, cap = 2, 37, 4, 2, 8, 1.5
  q, k, v, w, seg = _inputs((B, T, N, K, block), jnp.float32, 4, True)
  mask = ref.mask_from_keys([ref.window_keys(T, 11)] * N, seg, B)
  want, want_grads = ref.attention(q, k, v, mask, w, softcap=cap)
  uncapped = ref.attention(q, k, v, mask)
  assert np.abs(want - uncapped).max() > 0.1  # the cap matters here
  for fn, options in ((chunked_causal_attention, (("block_size", block),)),
                      (dense_causal_attention, ())):
    out, grads = ref.value_and_grads(
        fn, (*options, ("window", 11), ("softcap", cap)), q, k, v, w, seg)
    ref.assert_close(out, want, atol=1e-5)
    for got_g, want_g in zip(grads, want_grads):
      ref.assert_close(got_g, want_g, atol=1e-4)


def test_default_block_follows_the_cores_xla_may_use(monkeypatch):
  # One core: tiles that stay in its caches; more: tiles that XLA:CPU
  # splits over its threads (and the GPU's block).
  from longlora_jax.attention import chunked
  from longlora_jax.core import cpus
  monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0},
                      raising=False)
  assert chunked.default_block() == chunked.ONE_THREAD_BLOCK == 128
  monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0, 1},
                      raising=False)
  assert chunked.default_block() == chunked.DEFAULT_BLOCK == 512
