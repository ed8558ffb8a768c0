"""Malformed adapters, adapters for another model and bad save requests:
each refused with a CheckpointError that names the problem."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from longlora_jax import (CheckpointError, init_params, load_hf, save_hf)
from longlora_jax.model import lora
from longlora_jax.checkpoints.peft.adapter import load_peft, save_peft
from tests.references.peft_adapters import PREFIX, official_adapter, trained

@pytest.fixture
def adapter(tiny_hf, tmp_path):
  """(config, base params, a valid LoRA+ adapter dir of the mha model)."""
  directory, _ = tiny_hf("mha")
  config, base = load_hf(directory, dtype="float32")
  params = trained(lora.add_lora(base, rank=4, alpha=8, key=jax.random.key(4)))
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
  official_adapter(tiny_hf("mha")[0], official)
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
