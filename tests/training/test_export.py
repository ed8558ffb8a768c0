"""A run of each model family exports what it trained: the merged model in
transformers and the PEFT adapter on the base model give our logits; what
the run says about them loads the adapter as trained."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax import forward
from longlora_jax.model import nf4
from longlora_jax.model.config import LlamaConfig
from longlora_jax.demo.base import save_byte_tokenizer
from longlora_jax.checkpoints.checkpoint import Checkpoint
from longlora_jax.parallel.sharding import make_mesh
from longlora_jax.training.export import describe, write_outputs
from longlora_jax.training.options import make_spec
from longlora_jax.training.recipe import target_config
from longlora_jax.training.step import (initial_run_state, jit_train_step,
                                        params_of)
from tests.references import hf_models
from tests.references.hf_models import torch  # None without PyTorch


# Family -> context to extend to (twice its context): llama3 and yarn keep
# their type, the 9-head model trains S²-Attn with an odd head count.
CASES = {"llama3_1": 128, "qwen2_yarn": 256, "qwen3": 64, "olmo2": 64,
         "phi3": 64, "gemma2": 64, "gemma3_text": 64,
         "llama_9_heads": 64}


def _train_and_export(tiny_hf, tmp_path, name, quantize="none"):
  """Two LoRA+ steps on the tiny `name` extended to CASES[name] tokens,
  the frozen kernels in 4 bits for `quantize="nf4"`, exported to
  tmp_path/hf and tmp_path/peft: (base dir, spec, config, trained params,
  written)."""
  original, _ = tiny_hf(name)
  directory = tmp_path / "base"  # the model with a tokenizer to export
  shutil.copytree(original, directory)
  save_byte_tokenizer(directory)
  base = Checkpoint.open(directory)
  ctx = CASES[name]
  spec = make_spec({"ckpt": str(directory), "ctx": ctx, "dtype": "float32",
                    "remat": "none", "lr": 1e-2, "warmup": 0, "accum": 1,
                    "lora_rank": 4, "quantize": quantize}, task="extend",
                   base_config=base.config.to_hf_dict())
  config = target_config(spec, base.config)
  assert config.rope_type == base.config.rope_type or (
      config.rope_type == "linear")
  mesh = make_mesh("fsdp=1", jax.devices()[:1])
  state = initial_run_state(
      spec, base.params("float32", quantize=spec.quantize), mesh)
  rng = np.random.default_rng(0)
  batch = {"input_ids": jnp.asarray(
      rng.integers(0, config.vocab_size, (1, 1, ctx)), jnp.int32)}
  step, s_shard, b_shard = jit_train_step(config, spec.recipe, mesh, state,
                                          batch)
  state = jax.device_put(state, s_shard)
  for _ in range(2):
    state, metrics = step(state, jax.device_put(batch, b_shard))
  assert np.isfinite(float(metrics["loss"]))
  params = params_of(state)
  written = write_outputs(spec, base, config, params,
                          {"hf": tmp_path / "hf", "peft": tmp_path / "peft"})
  return directory, spec, config, params, written


def _on_base(directory, config, weights=None):
  """transformers' float32 model of `directory` with the RoPE scaling of
  `config` (the trained one), its parameters `weights` (name -> tensor)
  replaced where given."""
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32,
      rope_parameters=config.to_hf_dict()["rope_parameters"],
      max_position_embeddings=config.max_position_embeddings)
  with torch.no_grad():
    for name, value in (weights or {}).items():
      model.get_parameter(name).copy_(value)
  return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_trained_family_exports_to_transformers_and_peft(tiny_hf, tmp_path,
                                                         name):
  hf_models.require("torch", "peft")
  import peft
  import transformers
  directory, _, config, params, written = _train_and_export(
      tiny_hf, tmp_path, name)
  ids = hf_models.random_ids(config.vocab_size, 2, CASES[name], seed=1)
  ours = np.asarray(forward(config, params, jnp.asarray(ids)))
  merged = transformers.AutoModelForCausalLM.from_pretrained(
      written["hf"], dtype=torch.float32).eval()
  np.testing.assert_allclose(hf_models.hf_logits(merged, ids), ours,
                             atol=1e-4, rtol=1e-4)
  adapted = peft.PeftModel.from_pretrained(_on_base(directory, config),
                                           written["peft"]).eval()
  np.testing.assert_allclose(hf_models.hf_logits(adapted, ids), ours,
                             atol=1e-4, rtol=1e-4)
  card = (written["hf"] / "README.md").read_text()
  assert f"extended to {config.context:,} tokens" in card
  assert "The weights are float32" in card and "4-bit" not in card
  # What is compared moved: two steps changed the model's logits.
  base = Checkpoint.open(directory)
  untrained = forward(config, base.params("float32"), jnp.asarray(ids))
  assert np.abs(np.asarray(untrained) - ours).max() > 1e-3


def test_a_4bit_run_exports_what_peft_applies_on_the_dequantized_base(
    tiny_hf, tmp_path):
  """QLoRA's promise: the adapter trained over NF4 weights, applied by
  PEFT on the base whose linear weights are bitsandbytes' own NF4 round
  trip (blocks of 64, double quantization), gives our logits; so does the
  merged export, which says its precision, and the run says its base was
  4-bit."""
  hf_models.require("torch", "peft", "bitsandbytes")
  import peft
  import transformers
  from bitsandbytes import functional as F
  directory, spec, config, params, written = _train_and_export(
      tiny_hf, tmp_path, "llama3_1", quantize="nf4")
  layers = params["layers"]
  assert isinstance(layers["mlp"]["up_proj"]["kernel"], nf4.NF4Tensor)
  assert isinstance(layers["self_attn"]["q_proj"]["kernel"].w, nf4.NF4Tensor)
  reference = _on_base(directory, config)
  round_trip = {}
  for name, p in reference.named_parameters():
    if name.startswith("model.layers.") and name.endswith("proj.weight"):
      # Flat: the blocks run over the row-major weight either way, but
      # bitsandbytes 0.50's CPU dequantize_4bit of a 2-D weight whose rows
      # are no multiple of 64 long (down_proj's 96) misplaces blocks
      # (errors of 0.4 for weights of std 0.2); of the flat one it is right.
      packed, state = F.quantize_4bit(p.detach().reshape(-1), blocksize=64,
                                      compress_statistics=True,
                                      quant_type="nf4")
      round_trip[name] = F.dequantize_4bit(packed, state).reshape(p.shape)
  assert len(round_trip) == 7 * config.num_hidden_layers
  assert all(not torch.equal(w, reference.get_parameter(n))
             for n, w in round_trip.items())  # 4 bits changed each
  adapted = peft.PeftModel.from_pretrained(
      _on_base(directory, config, round_trip), written["peft"]).eval()
  ids = hf_models.random_ids(config.vocab_size, 2, CASES["llama3_1"], seed=1)
  ours = np.asarray(forward(config, params, jnp.asarray(ids)))
  np.testing.assert_allclose(hf_models.hf_logits(adapted, ids), ours,
                             atol=1e-4, rtol=1e-4)
  merged = transformers.AutoModelForCausalLM.from_pretrained(
      written["hf"], dtype=torch.float32).eval()
  np.testing.assert_allclose(hf_models.hf_logits(merged, ids), ours,
                             atol=1e-4, rtol=1e-4)
  # The adapter on the unquantized base is another model: the test tells
  # the dequantized base from the original.
  plain = peft.PeftModel.from_pretrained(_on_base(directory, config),
                                         written["peft"]).eval()
  assert np.abs(hf_models.hf_logits(plain, ids) - ours).max() > 1e-3
  assert json.loads((written["hf"] / "config.json").read_text())[
      "dtype"] == "float32"
  text = describe(written, config, spec)
  assert text.startswith("base weights: 4-bit NF4 (trained over them); the "
                         "merged model holds them dequantized to float32")
  # The exports say it too, in the model cards the Hub reads.
  from huggingface_hub import ModelCard
  for kind, says in (("hf", "merged model holds them dequantized to float32"),
                     ("peft", "on that dequantized base")):
    card = ModelCard.load(written[kind] / "README.md")
    assert card.data.base_model == str(directory.absolute())
    assert card.data.library_name == ("transformers" if kind == "hf"
                                      else "peft")
    assert "4-bit NF4" in card.text and says in card.text, card.text


def test_the_adapter_hint_loads_it_with_the_trained_rope_scaling(
    monkeypatch):
  # Llama-2 (4096 tokens) trained at 8192: linear PI x2, which transformers
  # reads with max_position_embeddings kept at 4096.
  peft = pytest.importorskip("peft", reason="needs peft (the reference)")
  config = LlamaConfig().with_context(8192)
  text = describe({"hf": Path("runs/x/hf"), "peft": Path("runs/x/peft")},
                  config)
  assert text.splitlines()[0] == "merged model (HF format): runs/x/hf"
  calls = []
  monkeypatch.setattr(peft.AutoPeftModelForCausalLM, "from_pretrained",
                      lambda *args, **kwargs: calls.append((args, kwargs)))
  exec("\n".join(line[2:] for line in text.splitlines()
                 if line.startswith("  ")), {})
  ((args, kwargs),) = calls
  assert args == ("runs/x/peft",)
  assert kwargs["rope_parameters"] == {"rope_type": "linear", "factor": 2.0,
                                       "rope_theta": 10000.0}
  assert kwargs["max_position_embeddings"] == 4096
  assert str(kwargs["dtype"]) == "torch.float32"
  assert describe({"hf": Path("h")}, config) == "merged model (HF format): h"
