"""A run of each model family exports what it trained: the merged model in
transformers and the PEFT adapter on the base model give our logits."""

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax import forward
from longlora_jax.model.config import LlamaConfig
from longlora_jax.demo.base import save_byte_tokenizer
from longlora_jax.checkpoints.checkpoint import Checkpoint
from longlora_jax.parallel.sharding import make_mesh
from longlora_jax.training.export import (print_commands, ruler_lengths,
                                         write_outputs)
from longlora_jax.training.options import make_spec
from longlora_jax.training.recipe import RunSpec, target_config
from longlora_jax.training.step import (initial_run_state, jit_train_step,
                                        params_of)
from tests.references import hf_models
from tests.references.hf_models import torch  # None without PyTorch


# Family -> context to extend to (twice its context): llama3 and yarn keep
# their type, the 9-head model trains S²-Attn with an odd head count.
CASES = {"llama3_1": 128, "qwen2_yarn": 256, "qwen3": 64,
         "llama_9_heads": 64}


@pytest.mark.parametrize("name", sorted(CASES))
def test_trained_family_exports_to_transformers_and_peft(tiny_hf, tmp_path,
                                                         name):
  original, _ = tiny_hf(name)
  hf_models.require("torch", "peft")
  import peft
  import transformers
  directory = tmp_path / "base"  # the model with a tokenizer to export
  shutil.copytree(original, directory)
  save_byte_tokenizer(directory)
  base = Checkpoint.open(directory)
  ctx = CASES[name]
  spec = make_spec({"ckpt": str(directory), "ctx": ctx, "dtype": "float32",
                    "remat": "none", "lr": 1e-2, "warmup": 0, "accum": 1,
                    "lora_rank": 4}, task="extend",
                   base_config=base.config.to_hf_dict())
  config = target_config(spec, base.config)
  assert config.rope_type == base.config.rope_type or (
      config.rope_type == "linear")
  mesh = make_mesh("fsdp=1", jax.devices()[:1])
  state = initial_run_state(spec, base.params("float32"), mesh)
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

  ids = hf_models.random_ids(config.vocab_size, 2, ctx, seed=1)
  ours = np.asarray(forward(config, params, jnp.asarray(ids)))
  merged = transformers.AutoModelForCausalLM.from_pretrained(
      written["hf"], dtype=torch.float32).eval()
  np.testing.assert_allclose(hf_models.hf_logits(merged, ids), ours,
                             atol=1e-4, rtol=1e-4)
  on_base = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32,
      rope_parameters=config.to_hf_dict()["rope_parameters"],
      max_position_embeddings=config.max_position_embeddings)
  adapted = peft.PeftModel.from_pretrained(on_base, written["peft"]).eval()
  np.testing.assert_allclose(hf_models.hf_logits(adapted, ids), ours,
                             atol=1e-4, rtol=1e-4)
  # What is compared moved: two steps changed the model's logits.
  untrained = forward(config, base.params("float32"), jnp.asarray(ids))
  assert np.abs(np.asarray(untrained) - ours).max() > 1e-3


def test_ruler_lengths_double_from_the_native_length_to_the_trained_one():
  assert ruler_lengths(4096, 100000) == [4096, 8192, 16384, 32768, 65536,
                                         100000]
  assert ruler_lengths(256, 1024) == [256, 512, 1024]
  assert ruler_lengths(4096, 4096) == [4096]


def test_the_three_evaluations_are_printed_at_the_trained_length(
    capsys, tmp_path):
  # A base with Llama-2's tokenizer class: the official passkey schedule.
  from transformers import LlamaTokenizer
  LlamaTokenizer().save_pretrained(tmp_path)
  base = Checkpoint("hf:meta-llama/Llama-2-7b-hf", tmp_path, LlamaConfig())
  config = LlamaConfig().with_context(100000)  # Llama-2's 4096, x25
  spec = RunSpec(ckpt="hf:meta-llama/Llama-2-7b-hf", ctx=100000,
                 base_config={}, data="pg19.jsonl")
  print_commands(spec, base, config, {"hf": Path("runs/x/hf")})
  lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
  assert ("python -m eval.perplexity --ckpt runs/x/hf --data pg19.jsonl "
          "--seq-len 4096 100000") in lines
  assert ("python -m eval.passkey --ckpt runs/x/hf --max-tokens 100000 "
          "--interval 12500") in lines
  assert ("python -m eval.ruler --ckpt runs/x/hf --lengths 4096 8192 16384 "
          "32768 65536 100000") in lines
