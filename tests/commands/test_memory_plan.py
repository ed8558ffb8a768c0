import json
import os
import re
import subprocess
import sys

import pytest

from eval import memory_plan
from longlora_jax.perf import gpu_target
from longlora_jax import LlamaConfig
from longlora_jax.core.errors import LongLoraError
from tests.conftest import ROOT


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
  assert result["mesh"] == {"data": 1, "fsdp": 8, "context": 1, "tensor": 1}
  # Loading: each device ends with an eighth of the bf16 model (norms and
  # embedding too, as 64 and 256 divide by 8), and holds at most two
  # one-layer parts of an MLP matrix beyond it; the host one layer of the
  # embedding, the largest unstacked tensor, for all 8 devices.
  model = frozen + (2 * 2 * 64 + 64 + 64 * 256) * 2
  assert result["loading_gib"] == {
      "device_final": model / 8 / 2**30,
      "device_transient": 2 * 64 * 128 * 2 / 8 / 2**30,
      "host_transient": 256 * 64 * 2 / 2**30}
  full = memory_plan.plan(memory_plan.parse_args(
      ["--model", str(tmp_path), "--ctx", "1024", "--attention", "full"]))
  assert (result["tflops_per_step"]["analytic_total"]
          < full["tflops_per_step"]["analytic_total"])


@pytest.mark.skipif(not gpu_target.AVAILABLE,
                    reason="needs jax[cuda12-local] (requirements-test.txt)")
def test_gpu_target_keeps_the_residual_stack_in_bfloat16(tmp_path):
  # Long enough that the stack of layer inputs kept for the backward pass,
  # [layers, batch, ctx, hidden], is the largest buffer.
  cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
                    num_hidden_layers=4, num_attention_heads=2,
                    max_position_embeddings=2048)
  cfg.save(tmp_path)

  def largest(target):
    # In a fresh process, as a user runs it: inside a long-lived test worker
    # of jax 0.12 this compile once took minutes, never alone.
    proc = subprocess.run(
        [sys.executable, "-m", "eval.memory_plan", "--model", str(tmp_path),
         "--ctx", "8192", "--mesh", "fsdp=8", "--target", target, "--json"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
        text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)["largest_temporaries"][0]

  gpu = largest("h100")
  assert gpu["shape"] == "bf16[4,1,8192,256]"
  assert gpu["gib"] * 2**30 == 4 * 8192 * 256 * 2
  # XLA:CPU of jax 0.10 kept the same stack in float32 (what the GPU
  # target was for); from 0.11 it keeps bfloat16 too.
  assert largest("cpu")["shape"] in ("f32[4,1,8192,256]", "bf16[4,1,8192,256]")


@pytest.mark.skipif(not gpu_target.AVAILABLE,
                    reason="needs JAX's CUDA plugin (requirements-test.txt)")
def test_readme_command_for_a_gpu_target_runs_as_written(tmp_path):
  # No JAX_PLATFORMS or XLA_FLAGS exported: the command sets up the CPU
  # host and its compile-only GPU devices itself.
  cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                    num_hidden_layers=2, num_attention_heads=2,
                    max_position_embeddings=256)
  cfg.save(tmp_path)
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  proc = subprocess.run(
      [sys.executable, "-m", "eval.memory_plan", "--model", str(tmp_path),
       "--ctx", "1024", "--mesh", "fsdp=2", "--target", "a100"],
      cwd=ROOT, env={**env, "PYTHONPATH": ROOT}, capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "XLA:GPU compile-only, NVIDIA A100-SXM4-80GB" in proc.stdout
  assert "s2 (cudnn)" in proc.stdout  # what a GPU run of `auto` takes


def test_eval_plan_splits_weights_and_cache_over_the_tensor_axis(tmp_path):
  cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                    num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256)
  cfg.save(tmp_path)
  plans = {mesh: memory_plan.plan_eval(memory_plan.parse_args(
      ["--eval", "--model", str(tmp_path), "--ctx", "4096", "--mesh", mesh,
       "--chunk", "512"])) for mesh in ("tensor=1", "tensor=2")}
  one, two = plans["tensor=1"], plans["tensor=2"]
  json.dumps(one)
  # K and V: 2 layers x 4096 positions x 2 kv heads x 32 dims, bf16.
  assert one["kv_cache_gib_total"] * 2**30 == 2 * 2 * 4096 * 2 * 32 * 2
  assert (one["kv_cache_split"], two["kv_cache_split"]) == (1, 2)
  # The donated cache comes back in place (the outputs besides: a row of
  # float32 logits, at most 1 KiB); each device holds half of it on two,
  # and half of the weights.
  for plan in (one, two):
    for m in (plan["per_device_gib"], plan["decode_per_device_gib"]):
      assert m["aliased"] == (plan["kv_cache_gib_total"]
                              / plan["kv_cache_split"])
      assert 0 < (m["outputs"] - m["aliased"]) * 2**30 < 2048
    # One query: none of the prefill chunk's activations.
    assert (plan["decode_per_device_gib"]["temporaries"]
            < plan["per_device_gib"]["temporaries"] / 2)
  assert two["per_device_gib"]["arguments"] < one["per_device_gib"][
      "arguments"]


def test_llama31_8b_preset_has_its_shapes():
  from longlora_jax.model.config import preset
  cfg = preset("llama3.1-8b")
  assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
          cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
          cfg.vocab_size) == (4096, 14336, 32, 32, 8, 128, 128256)
  assert cfg.rope_theta == 500000 and not cfg.tie_word_embeddings


def test_find_max_ctx_reports_each_probe_and_the_answer(tmp_path, capsys):
  cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=256)
  cfg.save(tmp_path)
  argv = ["--model", str(tmp_path), "--mesh", "fsdp=1"]
  total = lambda ctx: memory_plan.plan(memory_plan.parse_args(
      argv + ["--ctx", str(ctx)]))["per_device_gib"]["total"]
  # Usable memory between the plans of 3 and 4 steps of 256 tokens: the
  # search probes 1, 2 and 4 steps, then 3, and answers 3.
  low, high = total(768), total(1024)
  assert low < high
  memory_plan.main(argv + ["--find-max-ctx", "--ctx-step", "256",
                           "--usable-gib", str((low + high) / 2)])
  out = capsys.readouterr().out
  probes = re.findall(r"^probe (\d): ctx +([\d,]+) .* (fits|does not fit) ",
                      out, re.M)
  assert probes == [("1", "256", "fits"), ("2", "512", "fits"),
                    ("3", "1,024", "does not fit"), ("4", "768", "fits")]
  assert re.search(r"largest context that fits .* \(--usable-gib\) and "
                   r".*: 768 tokens", out)
  with pytest.raises(LongLoraError, match="even --ctx-step 256 tokens.*; "
                     r"try --offload activations,optimizer \(device\) or"):
    memory_plan.main(argv + ["--find-max-ctx", "--ctx-step", "256",
                             "--usable-gib", "1e-6"])
  with pytest.raises(LongLoraError, match=r"\(device\); try a larger "):
    memory_plan.main(argv + ["--find-max-ctx", "--ctx-step", "256",
                             "--usable-gib", "1e-6", "--offload",
                             "activations,optimizer"])
  with pytest.raises(LongLoraError, match="--ctx-step 260 does not split"):
    memory_plan.main(argv + ["--find-max-ctx", "--ctx-step", "260",
                             "--usable-gib", "1"])
  with pytest.raises(LongLoraError, match="drop --eval"):
    memory_plan.main(["--find-max-ctx", "--eval"])


def test_a_checkpoint_in_metas_layout_plans_as_its_hf_twin(tmp_path):
  # The loading line comes from the shapes and shardings alone, so Meta's
  # original layout (params.json + consolidated.00.pth) plans like the
  # same model in HF format.
  torch = pytest.importorskip("torch")
  meta, hf = tmp_path / "meta", tmp_path / "hf"
  meta.mkdir()
  # FFN width by Meta's rule: int(0.75 * int(2 * 4 * 64 / 3)) = 127 -> 128.
  (meta / "params.json").write_text(json.dumps(dict(
      dim=64, n_layers=2, n_heads=4, multiple_of=128, ffn_dim_multiplier=0.75,
      norm_eps=1e-5, vocab_size=256)))
  D, F, V = 64, 128, 256
  shapes = {"tok_embeddings.weight": (V, D), "norm.weight": (D,),
            "output.weight": (V, D)}
  for i in range(2):
    shapes.update({f"layers.{i}.attention.{w}.weight": (D, D)
                   for w in ("wq", "wk", "wv", "wo")})
    shapes.update({f"layers.{i}.feed_forward.w1.weight": (F, D),
                   f"layers.{i}.feed_forward.w2.weight": (D, F),
                   f"layers.{i}.feed_forward.w3.weight": (F, D),
                   f"layers.{i}.attention_norm.weight": (D,),
                   f"layers.{i}.ffn_norm.weight": (D,)})
  torch.save({k: torch.zeros(s, dtype=torch.bfloat16)
              for k, s in shapes.items()}, meta / "consolidated.00.pth")
  LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F,
              num_hidden_layers=2, num_attention_heads=4).save(hf)
  plans = [memory_plan.plan(memory_plan.parse_args(
      ["--model", str(d), "--ctx", "1024", "--mesh", "fsdp=8"]))
      for d in (meta, hf)]
  assert plans[0]["loading_gib"] == plans[1]["loading_gib"]
  assert plans[0]["trainable_params"] == plans[1]["trainable_params"]
  assert plans[0]["loading_gib"]["device_final"] > 0


def test_a_4bit_plan_holds_its_kernels_in_half_a_byte(tmp_path, capsys):
  """--quantize nf4: each frozen kernel of n weights is n/2 bytes of codes,
  n/64 one-byte block scales, a float32 scale per 256 of those, the 256
  floats of their 8-bit map and a float32 offset (per layer); the LM head
  stays bf16 (the embedding and norms train)."""
  cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=256)
  cfg.save(tmp_path)
  result = memory_plan.plan(memory_plan.parse_args(
      ["--model", str(tmp_path), "--ctx", "256", "--quantize", "nf4"]))
  assert result["quantize"] == "nf4"
  kernel = lambda n: n // 2 + n // 64 + 4 * -(-n // 64 // 256) + 256 * 4 + 4
  frozen = 2 * (4 * kernel(64 * 64) + 3 * kernel(64 * 128))
  frozen += 64 * 256 * 2  # the LM head
  assert abs(result["breakdown_estimate_gib"]["frozen_weights"] * 2**30
             - frozen / 8) < 1
  # Loading quantizes as it reads: a device ends with its share of the
  # 4-bit stacks (codes and block scales split 8 ways, the rest whole) and
  # of the bf16 rest; the host quantizes a layer of an MLP matrix whole:
  # it in bf16, its codes, 40 bytes a block and 32 MiB of chunk work
  # (nf4.quantize_host_bytes).
  share = lambda n: (n // 2 // 8 + n // 64 // 8 + 4 * -(-n // 64 // 256)
                     + 256 * 4 + 4)
  plain = (2 * 2 * 64 + 64 + 2 * 64 * 256) * 2 // 8
  n = 64 * 128
  assert result["loading_gib"] == {
      "device_final": (2 * (4 * share(64 * 64) + 3 * share(n)) + plain) / 2**30,
      "device_transient": 2 * share(n) / 2**30,
      "host_transient": (2 * n + n // 2 + 40 * n // 64 + 32 * 2**20) / 2**30}
  memory_plan._print_loading(result)
  assert capsys.readouterr().out.startswith(
      "loading (layer kernels quantized to NF4 as read, the rest bf16, "
      "straight into the shards): per device 0.00 GiB")
  with pytest.raises(LongLoraError, match="drop it with --eval or --full-ft"):
    memory_plan.main(["--quantize", "nf4", "--full-ft"])


def test_find_max_ctx_stops_where_the_host_runs_out(tmp_path, capsys):
  cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=256)
  cfg.save(tmp_path)
  # XLA:CPU reports no host temporaries, so the offloaded layer inputs are
  # counted by hand: 2 layers x ctx x 64 x 2 bytes, 65,536 at 256 tokens
  # and 131,072 at 512. 100,000 bytes of host bind at 256; the device, at
  # 1 GiB, would take far more.
  memory_plan.main(["--model", str(tmp_path), "--mesh", "fsdp=1",
                    "--offload", "activations", "--find-max-ctx",
                    "--ctx-step", "256", "--usable-gib", "1",
                    "--host-gib", str(100_000 / 2**30)])
  out = capsys.readouterr().out
  assert re.search(r"^probe 2: ctx +512 .* does not fit .*\(over: host\)$",
                   out, re.M)
  assert re.search(r": 256 tokens, .*\(hand count: layers x layer-input "
                   r"bytes\)$", out, re.M)
  assert re.search(r"^binding limit: host; 512 tokens need", out, re.M)
  # A bad budget is one line naming the option, before any compile.
  with pytest.raises(SystemExit):
    memory_plan.parse_args(["--host-gib", "-1"])
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == ("error: argument --host-gib: '-1' is not a finite "
                     "number > 0 (see --help)")


def test_nested_remat_plans_fewer_layer_inputs(tmp_path):
  # 16 layers in 4 blocks: 8 layer inputs kept at once instead of 16, each
  # [1024 tokens, 256] in bf16 (one sequence per device on fsdp=8).
  LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=64,
              num_hidden_layers=16, num_attention_heads=2,
              max_position_embeddings=256).save(tmp_path)
  plans = {r: memory_plan.plan(memory_plan.parse_args(
      ["--model", str(tmp_path), "--ctx", "1024", "--mesh", "fsdp=8",
       "--remat", r])) for r in ("full", "nested")}
  one = 1024 * 256 * 2 / 2**30
  kept = {r: p["breakdown_estimate_gib"]["layer_inputs_kept_for_backward"]
          for r, p in plans.items()}
  assert kept == {"full": 16 * one, "nested": 8 * one}
  saved = (plans["full"]["per_device_gib"]["temporaries"]
           - plans["nested"]["per_device_gib"]["temporaries"])
  assert saved >= 7 * one, (saved / one, plans)


def test_s2_by_group_plans_fewer_sequence_buffers(tmp_path):
  # Attention-heavy layers (hidden 256, 8 heads, MLP 8) at 4096 tokens per
  # device: by group, q, k, v, the output and their gradients exist for
  # one piece (2 x 1024 rows) instead of the whole sequence.
  LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=8,
              num_hidden_layers=2, num_attention_heads=8,
              max_position_embeddings=1024).save(tmp_path)
  plans = [memory_plan.plan(memory_plan.parse_args(
      ["--model", str(tmp_path), "--ctx", "4096", "--mesh", "fsdp=8",
       *flag])) for flag in ([], ["--s2-by-group"])]
  assert plans[1]["attention"] == "s2 by group"
  one = 4096 * 256 * 2 / 2**30  # [seq, hidden] in bf16
  saved = (plans[0]["per_device_gib"]["temporaries"]
           - plans[1]["per_device_gib"]["temporaries"])
  assert saved >= 5 * one, (saved / one, plans)
