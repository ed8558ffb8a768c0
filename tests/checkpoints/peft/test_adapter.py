import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from longlora_jax import CheckpointError, forward, load_hf, save_hf
from longlora_jax.model import lora
from longlora_jax.checkpoints.peft.adapter import load_peft, save_peft
from longlora_jax.parallel.sharding import make_mesh, shardings_like
from tests.references import hf_models
from tests.references.hf_models import peft, torch  # None without PyTorch
from tests.references.peft_adapters import (ATTN, PREFIX, official_adapter,
                                            peft_adapter, torch_base, trained)


def _ids(config):
  return hf_models.random_ids(config.vocab_size, 2, 20, seed=3)


def _logits(config, params):
  return np.asarray(forward(config, params, jnp.asarray(_ids(config))))


@pytest.mark.parametrize("name,mesh", [("mha", None), ("gqa", None),
                                       ("gqa", "fsdp=4,tensor=2")])
def test_save_peft_loads_in_pytorch(tiny_hf, tmp_path, name, mesh):
  directory, _ = tiny_hf(name)
  config, base = load_hf(directory, dtype="float32")
  params = trained(lora.add_lora(base, rank=4, alpha=8, key=jax.random.key(1)))
  if mesh:  # saved from its shards, one tensor at a time
    params = jax.device_put(params, shardings_like(params, make_mesh(mesh)))
  out = save_peft(config, params, tmp_path / "adapter",
                  base_model_name_or_path=str(directory))
  model = peft.PeftModel.from_pretrained(torch_base(directory), out).eval()
  ours = _logits(config, params)
  assert np.abs(ours - _logits(config, base)).max() > 0.1
  np.testing.assert_allclose(hf_models.hf_logits(model, _ids(config)), ours,
                             rtol=1e-4, atol=1e-4)
  # The layout PEFT documents: lora_A [r, in], lora_B [out, r].
  saved = load_file(out / "adapter_model.safetensors")
  kv = config.num_key_value_heads * config.head_dim
  key = f"{PREFIX}model.layers.1.self_attn.k_proj"
  assert saved[key + ".lora_A.weight"].shape == (4, config.hidden_size)
  assert saved[key + ".lora_B.weight"].shape == (kv, 4)
  assert f"{PREFIX}model.layers.1.input_layernorm.weight" in saved
  assert f"{PREFIX}model.embed_tokens.weight" in saved
  assert not any("mlp" in k or "lm_head" in k for k in saved)
  cfg = json.loads((out / "adapter_config.json").read_text())
  assert (cfg["r"], cfg["lora_alpha"]) == (4, 8)
  assert sorted(cfg["target_modules"]) == sorted(ATTN)
  assert cfg["modules_to_save"] == ["embed_tokens", "input_layernorm", "norm",
                                    "post_attention_layernorm"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
  # Merging in PyTorch gives the same model too.
  merged = model.merge_and_unload()
  np.testing.assert_allclose(hf_models.hf_logits(merged, _ids(config)), ours,
                             rtol=1e-4, atol=1e-4)
  # And back: bit-exact, in the saved dtype.
  _, again = load_peft(config, base, out)
  for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)
  assert jax.tree.structure(again) == jax.tree.structure(params)


def test_save_peft_tied_embeddings(tiny_hf, tmp_path):
  # A trained embedding of a tied model is also its output head.
  directory, _ = tiny_hf("odd_tied")
  config, base = load_hf(directory, dtype="float32")
  params = trained(lora.add_lora(base, rank=2, alpha=4, key=jax.random.key(2)))
  out = save_peft(config, params, tmp_path / "adapter")
  model = peft.PeftModel.from_pretrained(torch_base(directory), out).eval()
  np.testing.assert_allclose(hf_models.hf_logits(model, _ids(config)),
                             _logits(config, params), rtol=1e-4, atol=1e-4)


def test_merge_recipe_of_the_readme(tiny_hf, tmp_path):
  # PEFT's merge_and_unload, on the base loaded in float32 with the RoPE
  # scaling the adapter was trained with, saves the model that trained,
  # and the same model as our merged export.
  directory, _ = tiny_hf("mha")
  config, base = load_hf(directory, dtype="float32")
  config = config.with_context(4 * config.original_context)
  params = trained(lora.add_lora(base, rank=4, alpha=8, key=jax.random.key(5)))
  adapter = save_peft(config, params, tmp_path / "adapter")
  ours_merged = save_hf(config, lora.merge(params), tmp_path / "ours")
  scaled_base = torch_base(directory, rope_parameters={
      "rope_type": "linear", "factor": 4.0, "rope_theta": config.rope_theta})
  merged = peft.PeftModel.from_pretrained(scaled_base,
                                          adapter).merge_and_unload()
  merged.save_pretrained(tmp_path / "merged")
  ours = _logits(config, params)
  unscaled = dataclasses.replace(config, rope_scaling=None)
  assert np.abs(ours - _logits(unscaled, params)).max() > 0.1  # it matters
  for saved in (tmp_path / "merged", ours_merged):
    np.testing.assert_allclose(
        hf_models.hf_logits(torch_base(saved), _ids(config)), ours,
        rtol=1e-4, atol=1e-4)


def test_save_plain_lora_and_bfloat16(tiny_hf, tmp_path):
  directory, _ = tiny_hf("mha")
  config, base = load_hf(directory, dtype="bfloat16")
  params = trained(lora.add_lora(base, key=jax.random.key(3)))
  out = save_peft(config, params, tmp_path / "adapter", extra=())
  saved = load_file(out / "adapter_model.safetensors")
  assert all("lora_" in k for k in saved)
  assert {v.dtype.name for v in saved.values()} == {"bfloat16"}
  cfg = json.loads((out / "adapter_config.json").read_text())
  assert cfg["modules_to_save"] is None and cfg["r"] == 8
  _, loaded = load_peft(config, base, out)
  np.testing.assert_array_equal(loaded["embed_tokens"]["embedding"],
                                base["embed_tokens"]["embedding"])
  node = loaded["layers"]["self_attn"]["q_proj"]["kernel"]
  assert node.a.dtype == jnp.bfloat16 and node.scale == 2.0
  f32 = save_peft(config, params, tmp_path / "f32", extra=(), dtype="float32")
  saved = load_file(f32 / "adapter_model.safetensors")
  assert {v.dtype.name for v in saved.values()} == {"float32"}


@pytest.mark.parametrize("name,modules_to_save,use_rslora", [
    ("mha", None, False), ("gqa", None, False),
    ("mha", ["embed_tokens", "norm"], False),
    ("gqa", ["embed_tokens", "norm"], False), ("gqa", None, True)])
def test_load_peft_adapter_made_by_peft(tiny_hf, tmp_path, name,
                                        modules_to_save, use_rslora):
  directory, _ = tiny_hf(name)
  config, base = load_hf(directory, dtype="float32")
  model = peft_adapter(directory, tmp_path / "peft",
                        modules_to_save=modules_to_save, use_rslora=use_rslora)
  _, params = load_peft(config, base, tmp_path / "peft")
  ours = _logits(config, params)
  assert np.abs(ours - _logits(config, base)).max() > 0.1
  np.testing.assert_allclose(ours, hf_models.hf_logits(model, _ids(config)),
                             rtol=1e-4, atol=1e-4)
  # lora_alpha / r = 8 / 4, or 8 / sqrt(4) with rsLoRA.
  assert params["layers"]["self_attn"]["v_proj"]["kernel"].scale == (
      4.0 if use_rslora else 2.0)
  changed = not np.array_equal(params["norm"]["weight"], base["norm"]["weight"])
  assert changed == bool(modules_to_save)


# Family -> the modules PEFT adapts: Phi-3's fused projections whole (as
# our LoRA does: qkv_proj, o_proj, and gate_up_proj), every projection of
# Gemma 2, OLMo 2's and Gemma 3's attention. modules_to_save "norm" is a
# suffix: it takes each norm a family has (Gemma's four per layer, OLMo
# 2's and Gemma 3's q/k norms).
FAMILY_TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gemma2": [*ATTN, "gate_proj", "up_proj", "down_proj"],
    "olmo2": ATTN, "gemma3_text": ATTN}


@pytest.mark.parametrize("name", sorted(FAMILY_TARGETS))
def test_load_peft_adapter_made_by_peft_for_each_family(tiny_hf, tmp_path,
                                                        name):
  directory, _ = tiny_hf(name)
  config, base = load_hf(directory, dtype="float32")
  model = peft_adapter(directory, tmp_path / "peft",
                       target_modules=FAMILY_TARGETS[name],
                       modules_to_save=["embed_tokens", "norm"])
  adapted_config, params = load_peft(config, base, tmp_path / "peft")
  ids = hf_models.random_ids(config.vocab_size, 2, 20, seed=3)  # > window 8
  ours = np.asarray(forward(adapted_config, params, jnp.asarray(ids)))
  assert np.abs(ours - _logits(config, base)).max() > 0.1
  np.testing.assert_allclose(ours, hf_models.hf_logits(model, ids),
                             rtol=1e-4, atol=1e-4)
  adapted = {lora._path_name(path) for path, x in
             jax.tree_util.tree_leaves_with_path(params, is_leaf=lora.is_lora)
             if lora.is_lora(x)}
  assert len(adapted) == len(FAMILY_TARGETS[name]), adapted


@pytest.mark.parametrize("prefixed", [False, True])
def test_load_official_longlora_layout(tiny_hf, tmp_path, prefixed):
  directory, _ = tiny_hf("gqa")
  config, base = load_hf(directory, dtype="float32")
  model = official_adapter(directory, tmp_path / "official", prefixed=prefixed)
  assert sorted(p.name for p in (tmp_path / "official").iterdir()) == [
      "adapter_config.json", "adapter_model.bin", "trainable_params.bin"]
  _, params = load_peft(config, base, tmp_path / "official")
  assert not np.array_equal(params["embed_tokens"]["embedding"],
                            base["embed_tokens"]["embedding"])
  np.testing.assert_allclose(_logits(config, params),
                             hf_models.hf_logits(model, _ids(config)),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("peft_saves", [False, True])
def test_official_release_with_added_pad_token_grows_the_vocab(
    tiny_hf, tmp_path, peft_saves):
  # The published Llama-2-7b-longlora-* adapters were trained after adding a
  # [PAD] token: their embedding has one more row than the base model.
  directory, _ = tiny_hf("gqa")
  config, base = load_hf(directory, dtype="float32")
  out = tmp_path / "official"
  model = official_adapter(directory, out, new_tokens=1,
                            peft_saves=peft_saves)
  grown, params = load_peft(config, base, out)
  assert grown.vocab_size == config.vocab_size + 1
  assert params["lm_head"]["kernel"].shape == (config.hidden_size,
                                               config.vocab_size + 1)
  ids = hf_models.random_ids(grown.vocab_size, 2, 20, seed=3)
  ids[0, 5] = config.vocab_size  # the new token
  np.testing.assert_allclose(
      np.asarray(forward(grown, params, jnp.asarray(ids))),
      hf_models.hf_logits(model, ids), rtol=1e-4, atol=1e-4)
  if peft_saves:  # The embedding is in both files, and must agree.
    assert f"{PREFIX}model.embed_tokens.weight" in load_file(
        out / "adapter_model.safetensors")
    state = torch.load(out / "trainable_params.bin")
    state["model.embed_tokens.weight"][3, 5] += 1.0
    torch.save(state, out / "trainable_params.bin")
    with pytest.raises(CheckpointError, match=r"embed_tokens.*differs.*"
                       r"adapter_model\.safetensors.*trainable_params\.bin"):
      load_peft(config, base, out)
