import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax import (LlamaConfig, forward, init_params,
                          load_hf)
from longlora_jax.model.llama import lm_head_params
from tests.references import hf_models
from tests.references.hf_models import torch  # None without PyTorch


@functools.partial(jax.jit, static_argnums=0, static_argnames=("remat",))
def _logits(config, params, ids, remat="none"):
  return forward(config, params, ids, remat=remat)


@pytest.mark.parametrize("name", sorted(hf_models.TINY_CONFIGS))
@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 17), (3, 64)])
def test_logits_match_transformers(tiny_hf, name, batch, seq):
  directory, hf_model = tiny_hf(name)
  config, params = load_hf(directory, dtype=jnp.float32)
  ids = hf_models.random_ids(config.vocab_size, batch, seq, seed=seq)
  want = hf_models.hf_logits(hf_model, ids)
  got = np.asarray(_logits(config, params, jnp.asarray(ids)))
  assert got.dtype == np.float32 and got.shape == (batch, seq, config.vocab_size)
  assert np.abs(want).std() > 0.5  # Logits large enough for 1e-4 to matter.
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", sorted(hf_models.FAMILY_CONFIGS))
@pytest.mark.parametrize("batch,seq", [(1, 12), (3, 40), (2, 100)])
def test_families_match_transformers(tiny_hf, name, batch, seq):
  # Below and above each model's original context (16 to 32 tokens), where
  # the RoPE types differ. Dynamic NTK depends on the longest sequence a
  # transformers model has seen, so each length gets a fresh one.
  directory, _ = tiny_hf(name)
  hf_models.require("torch")
  import transformers
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32).eval()
  config, params = load_hf(directory, dtype=jnp.float32)
  assert config.model_type == hf_model.config.model_type
  ids = hf_models.random_ids(config.vocab_size, batch, seq, seed=seq)
  want = hf_models.hf_logits(hf_model, ids)
  got = np.asarray(_logits(config, params, jnp.asarray(ids)))
  assert np.abs(want).std() > 0.5
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_position_interpolation_matters(tiny_hf):
  # Negative control: the same weights without the factor are far off, so
  # the parity test above really checks the RoPE scaling.
  directory, hf_model = tiny_hf("pi4")
  config, params = load_hf(directory, dtype=jnp.float32)
  ids = hf_models.random_ids(config.vocab_size, 1, 48)
  unscaled = LlamaConfig(**{**config.__dict__, "rope_scaling": None})
  got = np.asarray(_logits(unscaled, params, jnp.asarray(ids)))
  assert np.abs(got - hf_models.hf_logits(hf_model, ids)).max() > 1e-2


def test_segments_equal_separate_documents(tiny_hf):
  # Two packed documents with restarted positions must give exactly what
  # transformers gives for each document alone.
  directory, hf_model = tiny_hf("gqa")
  config, params = load_hf(directory, dtype=jnp.float32)
  a = hf_models.random_ids(config.vocab_size, 1, 11, seed=1)
  b = hf_models.random_ids(config.vocab_size, 1, 9, seed=2)
  ids = np.concatenate([a, b], axis=1)
  segments = np.array([[0] * 11 + [1] * 9])
  positions = np.array([list(range(11)) + list(range(9))])
  got = np.asarray(forward(config, params, jnp.asarray(ids),
                           positions_BT=jnp.asarray(positions),
                           segment_ids_BT=jnp.asarray(segments)))
  want = np.concatenate([hf_models.hf_logits(hf_model, a),
                         hf_models.hf_logits(hf_model, b)], axis=1)
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_bfloat16_params_and_compute(tiny_hf):
  directory, hf_model = tiny_hf("mha")
  config, params = load_hf(directory, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  ids = hf_models.random_ids(config.vocab_size, 2, 24)
  got = np.asarray(_logits(config, params, jnp.asarray(ids)))
  assert got.dtype == np.float32
  want = hf_models.hf_logits(hf_model, ids)
  # bf16 has 8 mantissa bits: relative error of a few percent of the scale.
  assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
  # Mixed precision: fp32 compute on bf16 weights is closer.
  got32 = np.asarray(forward(config, params, jnp.asarray(ids),
                             dtype=jnp.float32))
  assert np.abs(got32 - want).max() < np.abs(got - want).max()


def test_init_matches_transformers_scheme():
  cfg = LlamaConfig(vocab_size=500, hidden_size=128, intermediate_size=256,
                    num_hidden_layers=2, num_attention_heads=4,
                    initializer_range=0.05, pad_token_id=3)
  params = init_params(cfg, jax.random.key(0))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, x in flat:
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      np.testing.assert_array_equal(x, 1.0)
    else:
      assert abs(float(jnp.std(x)) - 0.05) < 0.005, name
      assert abs(float(jnp.mean(x))) < 0.005, name
  np.testing.assert_array_equal(params["embed_tokens"]["embedding"][3], 0.0)
  # Layers are initialised independently, not copies of one another.
  q = params["layers"]["self_attn"]["q_proj"]["kernel"]
  assert not np.allclose(q[0], q[1])
  bf16 = init_params(cfg, jax.random.key(0), dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16))


def test_compile_time_does_not_unroll_layers():
  # nn.scan: the lowered program holds one layer body whatever the depth.
  def hlo_size(layers):
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4)
    params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return len(jax.jit(functools.partial(forward, cfg)).lower(
        params, ids).as_text())
  assert hlo_size(16) < 1.05 * hlo_size(2)


def test_unknown_attention_and_remat():
  cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8,
                    num_hidden_layers=1, num_attention_heads=2)
  params = init_params(cfg, jax.random.key(0))
  ids = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="unknown attention 'nope'"):
    forward(cfg, params, ids, attention="nope")
  with pytest.raises(ValueError, match="unknown remat policy"):
    forward(cfg, params, ids, remat="some")


def test_nf4_frozen_kernels_under_lora():
  """4-bit layer kernels with LoRA on some: the logits are those of the
  plain model whose kernels are bitsandbytes' dequantization of the same
  weights (plus a @ b, in float64); the gradient's compiled program keeps
  no dequantized [layers, ...] stack; `merge` gives the same model."""
  F = pytest.importorskip("bitsandbytes.functional")
  from flax import traverse_util
  from longlora_jax.model import lora, nf4
  config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=2, initializer_range=0.2)
  base = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))

  @jax.jit  # one compile, not one per eager op
  def with_lora(quantized):
    params = lora.add_lora(quantized, rank=4, alpha=8,
                           targets=("q_proj", "v_proj", "down_proj"),
                           key=jax.random.key(1))
    # Non-zero b, so the adapters matter.
    return jax.tree_util.tree_map_with_path(
        lambda path, x: 0.3 * jax.random.normal(jax.random.key(len(path)),
                                                x.shape)
        if getattr(path[-1], "name", None) == "b" else x, params)
  params = with_lora(nf4.quantize_layers(base))
  reference = {}
  for path, x in traverse_util.flatten_dict(base).items():
    if path[0] == "layers" and path[-1] == "kernel":
      # bitsandbytes quantizes torch's [out, in] weight of each layer, in
      # row-major blocks; flat, as its AVX-512 dequantization misplaces
      # blocks in rows that are not a multiple of 64 (see test_nf4).
      x = np.stack([F.dequantize_4bit(*F.quantize_4bit(
          torch.from_numpy(np.asarray(w).T.reshape(-1).copy()), blocksize=64,
          quant_type="nf4", compress_statistics=True)).numpy().reshape(
              w.shape[::-1]).T for w in x]).astype(np.float64)
      node = traverse_util.flatten_dict(params, is_leaf=lambda _, v: isinstance(
          v, lora.LoRA))[path]
      if lora.is_lora(node):
        x = x + node.scale * np.einsum("ldr,lrf->ldf", np.float64(node.a),
                                       np.float64(node.b))
    reference[path] = jnp.asarray(x, jnp.float32)
  ids = jnp.asarray(hf_models.random_ids(config.vocab_size, 2, 16))
  want = _logits(config, traverse_util.unflatten_dict(reference), ids)
  np.testing.assert_allclose(_logits(config, params, ids, remat="full"), want,
                             rtol=1e-4, atol=1e-4)
  merged = traverse_util.flatten_dict(jax.jit(
      lambda p: lora.merge(p, jnp.float32))(params))
  for path, x in reference.items():
    np.testing.assert_allclose(merged[path], x, rtol=1e-6, atol=1e-6)

  # Seq 12: no activation has a kernel's shape.
  trainable, frozen = lora.split(params, lora.trainable_mask(params))
  loss = lambda t: forward(config, lora.combine(t, frozen), ids[:1, :12]).sum()
  hlo = jax.jit(jax.grad(loss)).lower(trainable).compile().as_text()
  stacks = {f"[2,{d},{f}]" for d, f in ((64, 64), (64, 16), (16, 64),
                                        (64, 96), (96, 64))}
  assert not [s for s in stacks if f"f32{s}" in hlo or f"bf16{s}" in hlo]


def test_lm_head_params_is_the_tied_embedding_or_the_head():
  tied = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16,
                     num_hidden_layers=1, num_attention_heads=2,
                     tie_word_embeddings=True)
  params = {"embed_tokens": "E", "lm_head": "W", "layers": "L"}
  assert lm_head_params(tied, params) == {"embed_tokens": "E"}
  untied = dataclasses.replace(tied, tie_word_embeddings=False)
  assert lm_head_params(untied, params) == {"lm_head": "W"}
