"""S²-Attn by group against the official LongLoRA S²-Attn in transformers,
its refusals, and what it keeps (XLA's compiled buffers)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax import LlamaConfig, forward, init_params, load_hf
from longlora_jax.attention.dispatch import AttentionSpec
from longlora_jax.core.errors import LongLoraError
from longlora_jax.model.by_group import refusal
from tests.references import hf_models
from tests.references.hf_models import torch  # None without PyTorch


def test_equals_official_longlora(tiny_hf):
  # The official S²-Attn ("roll") inside transformers' Llama: logits and
  # gradients through every layer's pieces.
  hf_models.require("torch", "transformers")
  from tests.references import longlora_torch
  directory, _ = tiny_hf("gqa")
  config, params = load_hf(directory, dtype=jnp.float32)
  ids = hf_models.random_ids(config.vocab_size, 2, 16)
  spec = AttentionSpec(variant="roll", implementation="dense", by_group=True)
  loss = lambda p: jnp.mean(jax.nn.log_softmax(
      forward(config, p, jnp.asarray(ids), attention=spec, remat="full")))
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  hf_model = longlora_torch.transformers.LlamaForCausalLM.from_pretrained(
      directory, dtype=torch.float32, attn_implementation=longlora_torch.S2)
  want_value = torch.log_softmax(hf_model(torch.tensor(ids)).logits, -1).mean()
  want_value.backward()
  np.testing.assert_allclose(value, want_value.item(), rtol=1e-5)
  for layer in range(config.num_hidden_layers):
    attn = hf_model.model.layers[layer].self_attn
    for name in ("q_proj", "v_proj", "o_proj"):
      want = getattr(attn, name).weight.grad.numpy().T
      got = grads["layers"]["self_attn"][name]["kernel"][layer]
      np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-4)
    want = hf_model.model.layers[layer].input_layernorm.weight.grad.numpy()
    got = grads["layers"]["input_layernorm"]["weight"][layer]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-4)
  # Each token's row sums its positions' gradients through every layer: in
  # float32 each side is up to 5e-7 from its own float64 run (measured), so
  # 1e-6 apart is noise (one entry of 8,192 reached 1.5e-6 with
  # transformers 5.25).
  np.testing.assert_allclose(grads["embed_tokens"]["embedding"],
                             hf_model.model.embed_tokens.weight.grad.numpy(),
                             atol=3e-6, rtol=1e-4)


def test_refusals():
  base = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=8,
                     num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2)
  assert refusal(base) is None
  assert "context axis" in refusal(base, context=2)
  assert "bias" in refusal(dataclasses.replace(base, o_bias=True))
  assert "do not halve" in refusal(dataclasses.replace(
      base, num_attention_heads=3, num_key_value_heads=1))
  both = dataclasses.replace(base, norm_placement="both")
  assert "normalises the attention's output" in refusal(both)
  params = init_params(both, jax.random.key(0))
  with pytest.raises(LongLoraError, match="cannot run this model"):
    forward(both, params, jnp.zeros((1, 8), jnp.int32),
            attention=AttentionSpec(implementation="dense", by_group=True))


def test_keeps_fewer_sequence_buffers():
  # Attention-heavy layers (hidden 256, MLP 8): the whole-sequence S²-Attn
  # step holds q, k, v, the output and their gradients for all 4096 tokens
  # at once; by group, for one piece (2 x 1024 rows). XLA:CPU compiles the
  # gradient to 20.4 [seq, hidden] float32 buffers of temporaries, and to
  # 13.7 by group.
  config = LlamaConfig(vocab_size=8, hidden_size=256, intermediate_size=8,
                       num_hidden_layers=2, num_attention_heads=8, head_dim=32)
  params = jax.eval_shape(functools.partial(init_params, config),
                          jax.random.key(0))
  ids = jax.ShapeDtypeStruct((1, 4096), jnp.int32)
  one = 4096 * 256 * 4

  def temporaries(by_group):
    spec = AttentionSpec(implementation="chunked", by_group=by_group)
    loss = lambda p, i: jnp.sum(forward(config, p, i, attention=spec,
                                        remat="full"))
    compiled = jax.jit(jax.grad(loss)).lower(params, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes / one

  assert temporaries(False) - temporaries(True) >= 5
