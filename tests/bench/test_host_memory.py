"""bench.host_memory on a "70B-wide" checkpoint: Llama-2-70B's layer
shapes (hidden 8192, MLP 28672, 64 heads over 8 kv heads, vocab 32000),
two layers, bfloat16 (4.5 GB), made by transformers."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
from safetensors import safe_open

from longlora_jax.checkpoints.peft.layout import PREFIX
from longlora_jax.checkpoints.weights import open_weights
from tests.conftest import ROOT
from tests.references import hf_models

WIDE = dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
            num_hidden_layers=2, num_attention_heads=64,
            num_key_value_heads=8, max_position_embeddings=4096)
MAKE = f"""
import torch, transformers
from longlora_jax.demo.base import save_byte_tokenizer
config = transformers.LlamaConfig(**{WIDE!r})
torch.manual_seed(0)
with torch.device("meta"):
  model = transformers.LlamaForCausalLM(config)
model = model.to_empty(device="cpu").to(torch.bfloat16)
with torch.no_grad():
  for p in model.parameters():
    p.normal_(0.0, 0.02)
model.save_pretrained(__import__("sys").argv[1], max_shard_size="2GB")
save_byte_tokenizer(__import__("sys").argv[1])
"""


def _run(args, devices=8):
  env = {"JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=1200, env={**os.environ, **env})
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def test_wide_model_loads_into_shards_and_exports_in_parts(tmp_path):
  hf_models.require("torch")
  try:
    _measure(tmp_path)
  finally:  # 9 GB of files: not left for pytest's kept temporary folders
    shutil.rmtree(tmp_path, ignore_errors=True)


def _measure(tmp_path):
  ckpt = tmp_path / "wide"
  _run(["-c", MAKE, str(ckpt)])
  # 5GB output shards, as real runs write them: an exporter that holds a
  # shard file (let alone the model) would add more than the whole model.
  _run(["-m", "bench.host_memory", "--ckpt", str(ckpt), "--mesh",
        "fsdp=8", "--steps", "0", "--max-shard-size", "5GB", "--out",
        str(tmp_path / "out"), "--json", str(tmp_path / "memory.json")])
  report = json.loads((tmp_path / "memory.json").read_text())
  model = report["model_bytes"]
  assert model == 2 * (2 * 32000 * 8192 + 8192 + 2 * (
      2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192))
  # Loading adds the model's shards and one tensor in flight (the 0.5 GB
  # embedding, read for all 8 devices): not a second copy of the model.
  assert report["load"]["added"] < 1.25 * model, report["load"]
  # The merged export holds about a layer's largest tensor, a few times
  # over; the adapter its float32 embedding cast to bfloat16.
  assert report["export_hf"]["added"] < 0.4 * model, report["export_hf"]
  assert report["export_peft"]["added"] < 0.2 * model, report["export_peft"]
  # What was written is the model (no steps: LoRA adds nothing yet).
  written, source = open_weights(tmp_path / "out" / "hf"), open_weights(ckpt)
  assert sorted(written.files) == sorted(source.files)
  for name in ("model.embed_tokens.weight", "lm_head.weight",
               "model.layers.1.mlp.down_proj.weight",
               "model.layers.0.self_attn.k_proj.weight"):
    rows = (slice(1000, 1024), slice(None))
    np.testing.assert_array_equal(written.read(name, rows),
                                  source.read(name, rows), err_msg=name)
  with safe_open(str(tmp_path / "out" / "peft" / "adapter_model.safetensors"),
                 framework="numpy") as f:
    assert f"{PREFIX}model.embed_tokens.weight" in f.keys()
