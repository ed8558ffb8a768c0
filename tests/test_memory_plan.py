import json

from eval import memory_plan
from longlora_jax import LlamaConfig


def test_tiny_plan_runs_and_counts(tmp_path):
  cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=256)
  cfg.save(tmp_path)
  args = memory_plan.parse_args(["--model", str(tmp_path), "--ctx", "1024",
                                 "--mesh", "fsdp=8"])
  result = memory_plan.plan(args)
  json.dumps(result)  # serialisable for --json
  m = result["per_device_gib"]
  assert m["temporaries"] > 0 and m["total"] >= m["temporaries"]
  # LoRA r=8 on q, k, v, o (2 layers, 64 -> 64): 2 * 4 * 8 * (64 + 64);
  # embedding 256 * 64; norms 2 * 2 * 64 + 64.
  assert result["trainable_params"] == 8192 + 16384 + 320
  # Weights are split 8 ways: frozen bf16 bytes / 8.
  frozen = (2 * (4 * 64 * 64 + 3 * 64 * 128) + 64 * 256) * 2
  assert abs(result["breakdown_estimate_gib"]["frozen_weights"] * 2**30
             - frozen / 8) < 1
  assert result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  full = memory_plan.plan(memory_plan.parse_args(
      ["--model", str(tmp_path), "--ctx", "1024", "--attention", "full"]))
  assert (result["tflops_per_step"]["analytic_total"]
          < full["tflops_per_step"]["analytic_total"])
