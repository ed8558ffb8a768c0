import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from longlora_jax import (CheckpointError, forward, init_params, load_hf,
                          save_hf)
from longlora_jax import lora
from longlora_jax.io.peft import load_peft, save_peft
from tests.references import hf_models
from tests.references.hf_models import peft, torch  # None without PyTorch

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
PREFIX = "base_model.model."


def _ids(config):
  return hf_models.random_ids(config.vocab_size, 2, 20, seed=3)


def _logits(config, params):
  return np.asarray(forward(config, params, jnp.asarray(_ids(config))))


def _torch_base(directory, **kwargs):
  hf_models.require("torch", "peft")
  # A fresh copy: PEFT wraps the model it is given in place.
  return transformers.LlamaForCausalLM.from_pretrained(
      directory, dtype=torch.float32, **kwargs).eval()


def _trained(params, seed=0):
  """LoRA+ params as after training: non-zero b, changed embedding and norms."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = []
  for k, (path, x) in zip(keys, leaves):
    name = lora._path_name(path)
    if name.endswith("/b"):
      x = 0.3 * jax.random.normal(k, x.shape, x.dtype)
    elif "norm" in name or "embed" in name:
      x = x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
    out.append(x)
  return treedef.unflatten(out)


def _peft_adapter(directory, out, *, r=4, alpha=8, seed=0, **lora_kwargs):
  """An adapter made by PEFT itself, with random lora_B (and changed
  modules_to_save copies); returns the PyTorch logits it gives."""
  hf_models.require("torch", "peft")
  torch.manual_seed(seed)
  model = peft.get_peft_model(_torch_base(directory), peft.LoraConfig(
      r=r, lora_alpha=alpha, target_modules=ATTN, lora_dropout=0.0,
      **lora_kwargs))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.3)
      elif "modules_to_save" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(out)
  return model


def _official_adapter(directory, out, *, prefixed=False, seed=0, new_tokens=0,
                      peft_saves=False):
  """The official LongLoRA layout, written as its get_trainable_weights.py
  does: LoRA factors in adapter_model.bin ("default." dropped), embed and
  norm weights in trainable_params.bin with `base_model.model.` cut off.
  `new_tokens`: grow the vocabulary first as its fine-tune.py does (new
  input and output rows = the mean of the old ones). `peft_saves`: the
  adapter as its save_callback.py writes it with today's PEFT instead,
  `model.save_pretrained`, which adds a resized embedding and lm_head."""
  hf_models.require("torch", "peft")
  torch.manual_seed(seed)
  base = _torch_base(directory)
  if new_tokens:
    vocab = base.config.vocab_size
    base.resize_token_embeddings(vocab + new_tokens)
    with torch.no_grad():
      for emb in (base.get_input_embeddings().weight,
                  base.get_output_embeddings().weight):
        emb[vocab:] = emb[:vocab].mean(dim=0, keepdim=True)
  model = peft.get_peft_model(base, peft.LoraConfig(
      r=4, lora_alpha=16, target_modules=ATTN, lora_dropout=0.0))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.3)
      elif "embed" in name or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.eval()
  state = model.state_dict()
  if peft_saves:
    model.save_pretrained(out)
  else:
    model.peft_config["default"].save_pretrained(out)
    torch.save({k.replace("default.", ""): v for k, v in state.items()
                if "lora" in k}, out / "adapter_model.bin")
  torch.save({(k if prefixed else k[len(PREFIX):]): v
              for k, v in state.items()
              if "lora" not in k and ("embed" in k or "norm" in k)},
             out / "trainable_params.bin")
  return model


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_save_peft_loads_in_pytorch(tiny_hf, tmp_path, name):
  directory, _ = tiny_hf(name)
  config, base = load_hf(directory, dtype="float32")
  params = _trained(lora.add_lora(base, rank=4, alpha=8, key=jax.random.key(1)))
  out = save_peft(config, params, tmp_path / "adapter",
                  base_model_name_or_path=str(directory))
  model = peft.PeftModel.from_pretrained(_torch_base(directory), out).eval()
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
  params = _trained(lora.add_lora(base, rank=2, alpha=4, key=jax.random.key(2)))
  out = save_peft(config, params, tmp_path / "adapter")
  model = peft.PeftModel.from_pretrained(_torch_base(directory), out).eval()
  np.testing.assert_allclose(hf_models.hf_logits(model, _ids(config)),
                             _logits(config, params), rtol=1e-4, atol=1e-4)


def test_merge_recipe_of_the_readme(tiny_hf, tmp_path):
  # PEFT's merge_and_unload, on the base loaded in float32 with the RoPE
  # scaling the adapter was trained with, saves the model that trained,
  # and the same model as our merged export.
  directory, _ = tiny_hf("mha")
  config, base = load_hf(directory, dtype="float32")
  config = config.with_context(4 * config.original_context)
  params = _trained(lora.add_lora(base, rank=4, alpha=8, key=jax.random.key(5)))
  adapter = save_peft(config, params, tmp_path / "adapter")
  ours_merged = save_hf(config, lora.merge(params), tmp_path / "ours")
  torch_base = _torch_base(directory, rope_parameters={
      "rope_type": "linear", "factor": 4.0, "rope_theta": config.rope_theta})
  merged = peft.PeftModel.from_pretrained(torch_base, adapter).merge_and_unload()
  merged.save_pretrained(tmp_path / "merged")
  ours = _logits(config, params)
  unscaled = dataclasses.replace(config, rope_scaling=None)
  assert np.abs(ours - _logits(unscaled, params)).max() > 0.1  # it matters
  for saved in (tmp_path / "merged", ours_merged):
    np.testing.assert_allclose(
        hf_models.hf_logits(_torch_base(saved), _ids(config)), ours,
        rtol=1e-4, atol=1e-4)


def test_save_plain_lora_and_bfloat16(tiny_hf, tmp_path):
  directory, _ = tiny_hf("mha")
  config, base = load_hf(directory, dtype="bfloat16")
  params = _trained(lora.add_lora(base, key=jax.random.key(3)))
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
  model = _peft_adapter(directory, tmp_path / "peft",
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


@pytest.mark.parametrize("prefixed", [False, True])
def test_load_official_longlora_layout(tiny_hf, tmp_path, prefixed):
  directory, _ = tiny_hf("gqa")
  config, base = load_hf(directory, dtype="float32")
  model = _official_adapter(directory, tmp_path / "official", prefixed=prefixed)
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
  model = _official_adapter(directory, out, new_tokens=1,
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


# ---- bad input ----

@pytest.fixture
def adapter(tiny_hf, tmp_path):
  """(config, base params, a valid LoRA+ adapter dir of the mha model)."""
  directory, _ = tiny_hf("mha")
  config, base = load_hf(directory, dtype="float32")
  params = _trained(lora.add_lora(base, rank=4, alpha=8, key=jax.random.key(4)))
  return config, base, save_peft(config, params, tmp_path / "adapter")


def _edit_tensors(out, edit):
  file = out / "adapter_model.safetensors"
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file)


def _edit_config(out, **changes):
  file = out / "adapter_config.json"
  file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def test_adapter_for_another_model(adapter, tiny_hf, tmp_path):
  config, base, out = adapter
  # Same depth, but two kv heads: k_proj is 64 -> 32, mha's 64 -> 64.
  other = dataclasses.replace(config, num_key_value_heads=2)
  other_out = save_peft(
      other, lora.add_lora(init_params(other, jax.random.key(0)),
                           key=jax.random.key(0)), tmp_path / "other", extra=())
  with pytest.raises(CheckpointError,
                     match="k_proj adapts a 64 -> 32 projection.*64 -> 64.*"
                           "another model"):
    load_peft(config, base, other_out)
  # gqa has three layers, mha two.
  gqa_config, gqa_base = load_hf(tiny_hf("gqa")[0], dtype="float32")
  with pytest.raises(CheckpointError, match="2 layers.*model 3.*another model"):
    load_peft(gqa_config, gqa_base, out)
  gqa_out = save_peft(gqa_config,
                      lora.add_lora(gqa_base, key=jax.random.key(0)),
                      tmp_path / "gqa_adapter", extra=())
  with pytest.raises(CheckpointError, match="3 layers.*model 2.*another model"):
    load_peft(config, base, gqa_out)


def test_embedding_of_another_shape(adapter):
  config, base, out = adapter
  _edit_tensors(out, lambda t: t.update({
      f"{PREFIX}model.embed_tokens.weight": np.zeros((100, 64), np.float32)}))
  with pytest.raises(CheckpointError, match=r"embed_tokens.*\(100, 64\)"):
    load_peft(config, base, out)


def test_rank_mismatch_between_a_and_b(adapter):
  config, base, out = adapter
  _edit_tensors(out, lambda t: t.update({
      f"{PREFIX}model.layers.1.self_attn.v_proj.lora_B.weight":
          np.zeros((64, 5), np.float32)}))
  with pytest.raises(CheckpointError, match="rank mismatch.*v_proj.*r=4.*r=5"):
    load_peft(config, base, out)


def test_rank_disagrees_with_config(adapter):
  config, base, out = adapter
  _edit_config(out, r=8)
  with pytest.raises(CheckpointError, match="rank 4.*says r=8"):
    load_peft(config, base, out)


def test_unknown_target_module(adapter):
  config, base, out = adapter
  _edit_config(out, target_modules=["q_proj", "query_key_value"])
  with pytest.raises(CheckpointError, match="query_key_value.*do not exist"):
    load_peft(config, base, out)
  _edit_config(out, target_modules=["q_proj", "embed_tokens"])
  with pytest.raises(CheckpointError, match="linear projections only"):
    load_peft(config, base, out)
  _edit_config(out, target_modules=["q_proj"])
  with pytest.raises(CheckpointError, match="k_proj.*not target"):
    load_peft(config, base, out)


def test_missing_lora_factor(adapter):
  config, base, out = adapter
  _edit_tensors(out, lambda t: t.pop(
      f"{PREFIX}model.layers.1.self_attn.o_proj.lora_B.weight"))
  with pytest.raises(CheckpointError, match="lacks.*layers.1.self_attn.o_proj"):
    load_peft(config, base, out)


def test_modules_to_save_without_their_weights(adapter, tiny_hf, tmp_path):
  config, base, out = adapter
  _edit_tensors(out, lambda t: [t.pop(k) for k in list(t) if "lora_" not in k])
  with pytest.raises(CheckpointError, match="modules_to_save.*neither"):
    load_peft(config, base, out)
  # The official layout with its trainable_params.bin gone, but a config
  # that says the embedding and norms were trained.
  official = tmp_path / "official"
  _official_adapter(tiny_hf("mha")[0], official)
  (official / "trainable_params.bin").unlink()
  _edit_config(official, modules_to_save=["embed_tokens", "norm"])
  with pytest.raises(CheckpointError, match="embed_tokens.*trainable_params"):
    load_peft(config, base, official)


@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"peft_type": "LORA", "r": "eight", "lora_alpha": 16, '
     '"target_modules": ["q_proj"]}', "r must be a positive integer"),
    ('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}',
     "lora_alpha"),
    ('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}', "target_modules"),
    ('{"peft_type": "PREFIX_TUNING", "r": 4}', "only LORA"),
    ('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": true, '
     '"target_modules": ["q_proj"]}', "use_dora"),
    ('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "modules_to_save": '
     '"norm", "target_modules": ["q_proj"]}', "modules_to_save"),
])
def test_malformed_adapter_config(adapter, text, match):
  config, base, out = adapter
  (out / "adapter_config.json").write_text(text)
  with pytest.raises(CheckpointError, match=match):
    load_peft(config, base, out)


def test_missing_files(adapter, tmp_path):
  config, base, out = adapter
  with pytest.raises(CheckpointError, match="no adapter_config.json"):
    load_peft(config, base, tmp_path)
  (out / "adapter_model.safetensors").unlink()
  with pytest.raises(CheckpointError, match="no adapter weights"):
    load_peft(config, base, out)


def test_save_refusals(adapter, tmp_path):
  config, base, out = adapter
  params = lora.add_lora(base, key=jax.random.key(0))
  with pytest.raises(CheckpointError, match="not empty.*overwrite"):
    save_peft(config, params, out)
  save_peft(config, params, out, overwrite=True, extra=())
  assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
  with pytest.raises(CheckpointError, match="no LoRA adapters"):
    save_peft(config, base, tmp_path / "none")
  with pytest.raises(CheckpointError, match="LoRA adapter.*merge"):
    save_hf(config, params, tmp_path / "hf")
  with pytest.raises(CheckpointError, match="already hold LoRA"):
    load_peft(config, params, out)
  assert not (tmp_path / "none").exists() and not (tmp_path / "hf").exists()
