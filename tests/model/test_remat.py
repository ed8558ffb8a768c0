"""The remat policies against transformers' gradients, and what each keeps
(XLA's compiled buffers)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax import LlamaConfig, forward, init_params, load_hf
from longlora_jax.model.remat import (REMAT_POLICIES, kept_layer_inputs,
                                      remat_blocks)
from tests.references import hf_models
from tests.references.hf_models import torch  # None without PyTorch


@pytest.mark.parametrize("remat", sorted(REMAT_POLICIES))
def test_remat_policies_same_values_and_grads(tiny_hf, remat):
  directory, hf_model = tiny_hf("gqa")
  config, params = load_hf(directory, dtype=jnp.float32)
  ids = jnp.asarray(hf_models.random_ids(config.vocab_size, 2, 16))

  def loss(p):
    return jnp.mean(jax.nn.log_softmax(forward(config, p, ids, remat=remat)))

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  # Reference gradient: torch autograd through the transformers model.
  hf_model.zero_grad()
  logits = hf_model(torch.tensor(np.asarray(ids))).logits
  want_value = torch.log_softmax(logits, -1).mean()
  want_value.backward()
  np.testing.assert_allclose(value, want_value.item(), rtol=1e-5)
  want = hf_model.model.layers[1].self_attn.q_proj.weight.grad.numpy().T
  got = np.asarray(grads["layers"]["self_attn"]["q_proj"]["kernel"][1])
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-4)
  want = hf_model.model.embed_tokens.weight.grad.numpy()
  np.testing.assert_allclose(grads["embed_tokens"]["embedding"], want,
                             atol=1e-6, rtol=1e-4)


def test_nested_remat_blocks_by_hand():
  # b blocks keep b + layers / b inputs at once: 80 -> 8 + 10 = 18.
  assert [remat_blocks(n) for n in (2, 3, 4, 32, 80, 126)] == [1, 1, 2, 4, 8,
                                                               9]
  assert remat_blocks(80, "full") == 1
  assert [kept_layer_inputs(80, r) for r in ("full", "nested")] == [80, 18]


def test_nested_remat_equals_transformers(tmp_path):
  # 4 layers: 2 blocks of 2, so the nested scans really run.
  hf_models.require("torch")
  config = {**hf_models.TINY_CONFIGS["gqa"], "num_hidden_layers": 4}
  hf_model = hf_models.save_hf_llama(tmp_path, config)
  config, params = load_hf(tmp_path, dtype=jnp.float32)
  ids = jnp.asarray(hf_models.random_ids(config.vocab_size, 2, 16))
  loss = lambda p: jnp.mean(jax.nn.log_softmax(
      forward(config, p, ids, remat="nested")))
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  logits = hf_model(torch.tensor(np.asarray(ids))).logits
  want_value = torch.log_softmax(logits, -1).mean()
  want_value.backward()
  np.testing.assert_allclose(value, want_value.item(), rtol=1e-5)
  for layer in range(4):  # the layer axis comes back whole, in order
    want = hf_model.model.layers[layer].mlp.up_proj.weight.grad.numpy().T
    got = grads["layers"]["mlp"]["up_proj"]["kernel"][layer]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-4)


def test_nested_remat_keeps_fewer_layer_inputs():
  # 16 layers whose only large activations are the [seq, hidden] layer
  # inputs: "full" keeps 16 of them for the backward pass, "nested" 4 block
  # inputs and then one block's 4.
  config = LlamaConfig(vocab_size=8, hidden_size=256, intermediate_size=8,
                       num_hidden_layers=16, num_attention_heads=1,
                       head_dim=8)
  params = jax.eval_shape(functools.partial(init_params, config),
                          jax.random.key(0))
  ids = jax.ShapeDtypeStruct((1, 2048), jnp.int32)
  one_input = 2048 * 256 * 4

  def temp(remat):
    loss = lambda p, i: jnp.sum(forward(config, p, i, remat=remat))
    return jax.jit(jax.grad(loss)).lower(params, ids).compile(
        ).memory_analysis().temp_size_in_bytes

  full, nested = temp("full"), temp("nested")
  assert full >= 16 * one_input
  assert full - nested >= 7 * one_input


def test_offloaded_layer_inputs_give_the_same_gradients_bit_for_bit(tiny_hf):
  # "offload" keeps what "full" keeps, on the host: the same computation.
  # (XLA:CPU has the memory kinds, but JAX lowers the move to pinned_host
  # only for GPU and TPU; tests/training/test_step.py checks that XLA:GPU
  # really places the layer inputs in host memory.)
  directory, _ = tiny_hf("gqa")
  config, params = load_hf(directory, dtype=jnp.float32)
  ids = jnp.asarray(hf_models.random_ids(config.vocab_size, 2, 16))

  def grads(remat):
    loss = lambda p: jnp.mean(jax.nn.log_softmax(
        forward(config, p, ids, remat=remat)))
    return jax.jit(jax.value_and_grad(loss))(params)

  offloaded, full = grads("offload"), grads("full")
  for got, want in zip(jax.tree.leaves(offloaded), jax.tree.leaves(full)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert np.abs(np.asarray(full[1]["layers"]["mlp"]["up_proj"]["kernel"])
                ).max() > 0
