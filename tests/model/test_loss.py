import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax import LlamaConfig, forward, hidden_states, init_params
from longlora_jax.model.loss import (IGNORE_INDEX, chunked_cross_entropy,
                               next_token_targets)

CFG = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4,
                  initializer_range=0.5)


def _reference_loss(logits, labels):
  """HF semantics in float64: shift, skip -100, sum and count."""
  logits = np.asarray(logits, np.float64)[:, :-1]
  labels = np.asarray(labels)[:, 1:]
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  valid = labels != IGNORE_INDEX
  picked = np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  return -(picked * valid).sum(), valid.sum()


def test_next_token_targets():
  labels = jnp.array([[5, 6, 7, -100], [1, -100, 3, 4]])
  np.testing.assert_array_equal(next_token_targets(labels),
                                [[6, 7, -100, -100], [-100, 3, 4, -100]])


@pytest.mark.parametrize("chunk", [4, 7, 64])
def test_chunked_equals_full_cross_entropy(chunk):
  params = init_params(CFG, jax.random.key(0))
  rng = np.random.default_rng(0)
  ids = rng.integers(0, CFG.vocab_size, (2, 23))
  labels = ids.copy()
  labels[0, :9] = IGNORE_INDEX  # e.g. a prompt
  labels[1, 15:] = IGNORE_INDEX  # e.g. padding
  h = hidden_states(CFG, params, jnp.asarray(ids))
  loss_sum, count = chunked_cross_entropy(
      CFG, params, h, next_token_targets(jnp.asarray(labels)), chunk_size=chunk)
  logits = forward(CFG, params, jnp.asarray(ids))
  for row, want_count in [(0, 23 - 9), (1, 15 - 1)]:
    want_sum, count_ref = _reference_loss(logits[row:row + 1], labels[row:row + 1])
    assert int(count[row]) == count_ref == want_count
    np.testing.assert_allclose(float(loss_sum[row]), want_sum, rtol=1e-5)


def test_gradient_equals_dense_loss_gradient():
  params = init_params(CFG, jax.random.key(1))
  ids = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 16)))
  targets = next_token_targets(ids)

  def chunked(p):
    s, n = chunked_cross_entropy(CFG, p, hidden_states(CFG, p, ids), targets,
                                 chunk_size=5)
    return s.sum() / n.sum()

  def dense(p):
    logp = jax.nn.log_softmax(forward(CFG, p, ids)[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

  g1, g2 = jax.grad(chunked)(params), jax.grad(dense)(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_logits_never_materialised_whole():
  # The compiled loss keeps no [batch, seq, vocab] buffer: its temporaries
  # stay below one full logits tensor, which dense cross-entropy needs.
  cfg = LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=1, num_attention_heads=4)
  params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
  h = jax.ShapeDtypeStruct((1, 4096, 32), jnp.float32)
  t = jax.ShapeDtypeStruct((1, 4096), jnp.int32)

  def loss(p, h, t):
    s, n = chunked_cross_entropy(cfg, p, h, t, chunk_size=256)
    return s.sum() / n.sum()

  full_logits_bytes = 4096 * 4096 * 4
  mem = jax.jit(jax.grad(loss, argnums=1)).lower(params, h, t).compile(
  ).memory_analysis()
  assert mem.temp_size_in_bytes < full_logits_bytes / 4


def _frozen_head_loss(cfg, params, chunk):
  """(loss sum, its gradient with respect to the hidden states), the LM head
  frozen (LoRA+)."""
  def loss(h, t):
    return chunked_cross_entropy(cfg, params, h, t, chunk_size=chunk)[0].sum()
  return jax.value_and_grad(loss)


@pytest.mark.parametrize("tied,cap", [(False, None), (True, 2.0)])
def test_frozen_head_gradient_equals_float64(tied, cap):
  # The gradient made in the forward pass (the logits are not recomputed)
  # against NumPy in float64: d/dh of sum(lse - logit[target]) through the
  # soft cap, with ignored targets.
  cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=1, num_attention_heads=4,
                    tie_word_embeddings=tied, final_logit_softcapping=cap)
  params = init_params(cfg, jax.random.key(2))
  rng = np.random.default_rng(2)
  h = rng.standard_normal((2, 13, 32)).astype(np.float32)
  t = rng.integers(0, 101, (2, 13))
  t[0, 3:6] = IGNORE_INDEX
  _, got = _frozen_head_loss(cfg, params, 5)(jnp.asarray(h), jnp.asarray(t))
  w = np.asarray(params["embed_tokens"]["embedding"] if tied else
                 params["lm_head"]["kernel"].T, np.float64)  # [V, D]
  z = h.astype(np.float64) @ w.T
  dz_dx = np.ones_like(z)
  if cap:
    z, dz_dx = cap * np.tanh(z / cap), 1 - np.tanh(z / cap) ** 2
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  valid = t != IGNORE_INDEX
  p[np.arange(2)[:, None], np.arange(13)[None], np.where(valid, t, 0)] -= 1
  want = ((p * valid[..., None]) * dz_dx) @ w
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def _head_products(grad_fn, *args) -> int:
  """Matrix products with the vocabulary in their shapes (101) in the
  lowered program (the loss is an output, so its products all stay)."""
  text = jax.jit(grad_fn).lower(*args).as_text()
  return sum("dot_general" in line and "101" in line
             for line in text.splitlines())


def test_frozen_head_runs_twice_per_chunk_trained_head_four_times():
  # Frozen (LoRA+): the logits, then their gradient, in the forward pass.
  # Trained: the logits; in the backward pass the logits again, then the
  # gradients of the states and of the head.
  params = init_params(CFG, jax.random.key(3))
  h = jnp.zeros((1, 8, 32))
  t = jnp.zeros((1, 8), jnp.int32)
  assert _head_products(_frozen_head_loss(CFG, params, 8), h, t) == 2

  def trained(p, h, t):
    return chunked_cross_entropy(CFG, p, h, t, chunk_size=8)[0].sum()
  assert _head_products(jax.value_and_grad(trained, argnums=(0, 1)), params,
                        h, t) == 4
