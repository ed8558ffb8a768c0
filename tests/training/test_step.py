import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from jax.sharding import PartitionSpec as P

from longlora_jax import LlamaConfig, LongLoraError, forward, init_params
from longlora_jax.checkpoints.checkpoint import Checkpoint
from longlora_jax.perf import gpu_target
from longlora_jax.model import lora
from longlora_jax.attention.dispatch import AttentionSpec
from longlora_jax.parallel.sharding import make_mesh, shardings_like
from longlora_jax.training.options import make_spec
from longlora_jax.training.recipe import RunSpec, TrainConfig, target_config
from longlora_jax.training.step import (init_state, initial_run_state,
                                        jit_train_step, learning_rate,
                                        lower_step, params_of)
from tests.references import hf_models
from tests.references.hf_models import torch  # None without PyTorch

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.2)
# Adam's first step is lr * g / (|g| + eps): for gradients that cancel to
# near zero, summation-order rounding (which sharding changes) decides the
# update. A larger eps keeps that step a smooth function of g, so sharded and
# unsharded parameters can be compared at 1e-5.
TC = TrainConfig(attention=AttentionSpec("s2"), dtype="float32", lr=1e-2,
                 warmup=0, remat="full", loss_chunk=8, eps=1e-3)
FULL = AttentionSpec("full", implementation="dense")


def _state(tc=TC, mode="lora+"):
  params = init_params(CFG, jax.random.key(0))
  if mode == "full":
    return init_state(params, lora.full_mask(params), tc)
  params = lora.add_lora(params, key=jax.random.key(1))
  # Non-zero B so the adapters matter from the first step.
  params = jax.tree.map(
      lambda x: x.replace(b=x.a[..., :1, :1] * 0 + 0.05 * jnp.ones_like(x.b))
      if lora.is_lora(x) else x, params, is_leaf=lora.is_lora)
  return init_state(params, lora.trainable_mask(params), tc)


def _batch(accum, rows, seq=32, seed=0):
  ids = np.random.default_rng(seed).integers(0, CFG.vocab_size,
                                             (accum, rows, seq))
  return {"input_ids": jnp.asarray(ids, jnp.int32)}


def _run(state, batch, mesh_spec, devices=None, tc=TC):
  mesh = make_mesh(mesh_spec, devices)
  step, s_shard, b_shard = jit_train_step(CFG, tc, mesh, state, batch)
  state = jax.device_put(state, s_shard)
  return step(state, jax.device_put(batch, b_shard))


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-7):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_sharded_step_equals_single_device():
  batch = _batch(1, 8)
  one, m1 = _run(_state(), batch, "fsdp=1", devices=jax.devices()[:1])
  eight, m8 = _run(_state(), batch, "data=2,fsdp=4")
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
  # Near g = 0 the step moves by up to lr / eps = 10 times a gradient's
  # rounding (about 1e-8 here, which sharding's sum order changes), so 1e-6;
  # a sharding error (a sum missed or doubled) shows in the loss and the
  # gradient norm above, and moves a parameter whose |g| is 0.01 by 7e-4.
  _assert_trees_close(eight.trainable, one.trainable, atol=1e-6)
  assert int(m8["tokens"]) == 8 * 31


@pytest.mark.parametrize("mesh_spec,attention,segments", [
    ("context=8", AttentionSpec("s2"), True),  # L = 6 = G/2 = 48/8
    ("fsdp=2,context=4", AttentionSpec("s2", variant="roll"), False),
    ("context=2,data=4", AttentionSpec("s2"), False),
    ("context=8", AttentionSpec("s2", variant="roll"), True),
    ("fsdp=2,context=4", FULL, True),
])
def test_context_parallel_step_equals_single_device(mesh_spec, attention,
                                                    segments):
  # Each device holds 1/context of every row: the next-token targets cross
  # the slices, RoPE takes global positions and the loss counts every token.
  tc = dataclasses.replace(TC, attention=attention)
  batch = _batch(1, 4, seq=48, seed=3)
  if segments:
    cuts = np.random.default_rng(4).integers(0, 3, (1, 4, 48))
    batch["segment_ids"] = jnp.asarray(np.sort(cuts, axis=-1), jnp.int32)
  one, m1 = _run(_state(tc), batch, "fsdp=1", devices=jax.devices()[:1],
                 tc=tc)
  eight, m8 = _run(_state(tc), batch, mesh_spec, tc=tc)
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-4)
  _assert_trees_close(eight.trainable, one.trainable, rtol=1e-4, atol=1e-6)
  assert int(m8["tokens"]) == int(m1["tokens"]) == 4 * 47
  # Weights are split over fsdp x context (data=4 keeps whole copies).
  sizes = dict(p.split("=") for p in mesh_spec.split(","))
  ways = int(sizes.get("fsdp", 1)) * int(sizes["context"])
  q = eight.frozen["layers"]["self_attn"]["q_proj"]["kernel"].w  # [2, 32, 32]
  assert q.sharding.shard_shape(q.shape) == (2, 32 // ways, 32)


def test_state_is_sharded_by_the_rules():
  state, _ = _run(_state(), _batch(1, 8), "fsdp=8")
  embed = state.trainable["embed_tokens"]["embedding"]  # [64, 32]
  assert embed.sharding.spec == P("fsdp", None)
  assert embed.sharding.shard_shape(embed.shape) == (8, 32)
  adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw's first state
  assert adam.mu["embed_tokens"]["embedding"].sharding.spec == P("fsdp", None)
  w = state.frozen["layers"]["self_attn"]["q_proj"]["kernel"].w  # [2, 32, 32]
  assert w.sharding.spec == P(None, "fsdp", None)
  # The optimizer holds state for the trainable leaves only.
  assert jax.tree.structure(adam.mu) == jax.tree.structure(state.trainable)
  assert state.frozen["layers"]["self_attn"]["q_proj"]["kernel"].a is None


def test_initial_run_state_is_made_in_its_shards():
  # From weights loaded into their shards: the LoRA factors and optimizer
  # moments are made in theirs, and the frozen weights are not copied.
  mesh = make_mesh("fsdp=8")
  base = init_params(CFG, jax.random.key(0))
  want = np.asarray(base["layers"]["mlp"]["up_proj"]["kernel"])
  params = jax.device_put(base, shardings_like(base, mesh))
  up = params["layers"]["mlp"]["up_proj"]["kernel"]
  buffers = {s.device: s.data.unsafe_buffer_pointer()
             for s in up.addressable_shards}
  spec = RunSpec(ckpt="demo", ctx=64, base_config=CFG.to_hf_dict(),
                 recipe=TC, lora_rank=8)
  state = initial_run_state(spec, params, mesh)
  assert up.is_deleted()  # consumed, as documented
  frozen = state.frozen["layers"]["mlp"]["up_proj"]["kernel"]
  assert {s.device: s.data.unsafe_buffer_pointer()
          for s in frozen.addressable_shards} == buffers
  np.testing.assert_array_equal(frozen, want)
  q = state.trainable["layers"]["self_attn"]["q_proj"]["kernel"]
  moments = [x for x in jax.tree.leaves(state.opt_state)
             if x.shape == q.a.shape]
  for x in [q.a, q.b, state.trainable["embed_tokens"]["embedding"],
            *moments]:
    assert len(x.sharding.device_set) == 8
    assert x.addressable_shards[0].data.size * 8 == x.size, x.shape
  assert moments and not np.asarray(q.b).any() and np.asarray(q.a).any()


def test_four_micro_batches_equal_one_big_batch():
  ids = _batch(1, 8)["input_ids"]
  big, m_big = _run(_state(), {"input_ids": ids}, "fsdp=8")
  micro, m_micro = _run(_state(), {"input_ids": ids.reshape(4, 2, 32)},
                        "data=2,tensor=-1")  # also exercises tensor parallel
  np.testing.assert_allclose(m_micro["loss"], m_big["loss"], rtol=1e-5)
  _assert_trees_close(micro.trainable, big.trainable)


def test_loss_is_the_model_cross_entropy_and_training_lowers_it():
  state = _state(mode="full", tc=dataclasses.replace(TC, attention=FULL))
  batch = _batch(1, 8, seq=16)
  ids = batch["input_ids"][0]
  logits = forward(CFG, params_of(state), ids)
  logp = jax.nn.log_softmax(logits[:, :-1])
  want = -float(jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1)))
  tc = dataclasses.replace(TC, attention=FULL)
  losses = []
  for _ in range(5):
    state, metrics = _run(state, batch, "fsdp=8", tc=tc)
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses[0], want, rtol=1e-5)
  assert losses[-1] < losses[0] - 0.1


def test_learning_rate_schedules():
  tc = TrainConfig(lr=2e-5, warmup=20, steps=100)
  lr = learning_rate(tc)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(10)), 1e-5)
  np.testing.assert_allclose([float(lr(s)) for s in (20, 50, 99)], 2e-5)
  cos = learning_rate(TrainConfig(lr=1.0, warmup=0, steps=10,
                                  schedule="cosine"))
  np.testing.assert_allclose(float(cos(5)), 0.5, atol=1e-6)
  with pytest.raises(LongLoraError, match="unknown schedule"):
    TrainConfig(schedule="exp")


@pytest.mark.parametrize("rows,seq,message", [
    (6, 32, "6 sequences per micro-batch does not divide over the 8"),
    (8, 36, "seq=36.*multiple of 8, e.g. 32 or 40"),
])
def test_bad_shapes_fail_before_compiling(rows, seq, message):
  state = _state()
  with pytest.raises(LongLoraError, match=message):
    jit_train_step(CFG, TC, make_mesh("fsdp=8"), state, _batch(1, rows, seq))


def test_a_context_that_does_not_split_fails_before_compiling():
  with pytest.raises(LongLoraError, match="context of 36 tokens does not "
                     "split over the 8 devices.*e.g. 40"):
    jit_train_step(CFG, TC, make_mesh("context=8"), _state(),
                   _batch(1, 1, 36))


def _gpu_step_calls(tc, mesh_spec, target):
  """(the custom-call lines naming `target`, the whole HLO) of a 2-layer
  train step at 1024 tokens (head_dim 64) compiled by XLA:GPU for 8
  compile-only H100s (JAX's CUDA plugin, no GPU)."""
  cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=2,
                    max_position_embeddings=1024)
  mesh = make_mesh(mesh_spec, gpu_target.devices("h100", 8))
  with gpu_target.assume_cudnn():
    hlo = lower_step(cfg, tc, mesh, ctx=1024)[0].compile().as_text()
  return [line for line in hlo.splitlines()
          if "custom-call(" in line and target in line], hlo


@pytest.mark.skipif(not gpu_target.AVAILABLE,
                    reason="needs jax[cuda12-local] (requirements-test.txt)")
def test_fused_kernel_runs_on_each_devices_rows_when_compiled_for_gpu():
  # The Triton custom call has no partitioning rule: unless each device
  # calls it on its own rows, GSPMD all-gathers q, k, v and every device
  # attends all 8.
  tc = TrainConfig(attention=AttentionSpec(implementation="pallas"), accum=1)
  calls, hlo = _gpu_step_calls(tc, "fsdp=8", "triton")
  assert len(calls) >= 3  # forward, dQ, dK/dV
  for line in calls:
    # Operands are [batch, seq, heads, head_dim]: one row per device.
    rows = re.findall(r"bf16\[(\d+),1024,2,64\]", line)
    assert rows and set(rows) == {"1"}, line
  assert not re.search(r"all-gather[^\n]*bf16\[8,1024,2,64\]", hlo)


@pytest.mark.skipif(not gpu_target.AVAILABLE,
                    reason="needs JAX's CUDA plugin (requirements-test.txt)")
def test_context_step_runs_the_fused_kernel_on_windows_for_gpu():
  # --mesh context=8, default attention: each device's S²-Attn is the
  # Pallas kernel on its own 128 queries and a window of 256 keys and values
  # (a halo of 128 = G/2 fetched by collective-permute, then its own), never
  # the 1024-token sequence.
  calls, hlo = _gpu_step_calls(TrainConfig(accum=1), "context=8", "triton")
  assert len(calls) >= 3  # forward, dQ, dK/dV
  for line in calls:
    shapes = set(re.findall(r"bf16\[1,(\d+),2,64\]", line))
    assert shapes == {"128", "256"}, line
  assert "collective-permute" in hlo
  assert not re.search(r"bf16\[1,1024,2,64\]", hlo)


@pytest.mark.skipif(not gpu_target.AVAILABLE,
                    reason="needs JAX's CUDA plugin (requirements-test.txt)")
def test_cudnn_s2_runs_on_each_devices_rows_when_compiled_for_gpu():
  # The same for grouped cuDNN S²-Attn, `auto`'s choice on a GPU: with one
  # row per device its main call holds the 4 + 3 groups of G = 256 of one
  # row ([7, 256, heads / 2, 64]), not of all 8 (56).
  tc = TrainConfig(attention=AttentionSpec(implementation="cudnn"), accum=1)
  calls, hlo = _gpu_step_calls(tc, "fsdp=8", "__cudnn$fmha")
  assert len(calls) == 6  # forward, its recomputation, backward: 2 each
  shapes = {shape for line in calls
            for shape in re.findall(r"bf16\[(\d+),(\d+),1,64\]", line)}
  assert shapes == {("7", "256"), ("2", "128")}, shapes
  assert not re.search(r"all-gather[^\n]*bf16\[8,1024,2,64\]", hlo)


@pytest.mark.skipif(not gpu_target.AVAILABLE,
                    reason="needs JAX's CUDA plugin (requirements-test.txt)")
def test_a_4bit_step_holds_no_bf16_stack_of_a_layer_kernel():
  # XLA:GPU for 8 compile-only H100s (fsdp=8): with --quantize nf4 every
  # kernel is dequantized a layer at a time inside the scan, so no bf16
  # array of the compiled step (buffer or fused value) spans the 5 layers
  # of a kernel, whole or this device's eighth, in any axis order; the
  # bf16 step, whose parameters are such stacks, shows the check sees them.
  # Without remat of the layers, where the backward would keep each layer's
  # dequantized weight but for the projection's own remat (checked: without
  # it, the 4-bit step holds [5, 32, 768] stacks; so it does dequantizing
  # the stacks before the scan).
  cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=768,
                    num_hidden_layers=5, num_attention_heads=2,
                    max_position_embeddings=1024)
  mesh = make_mesh("fsdp=8", gpu_target.devices("h100", 8))
  stacks = {tuple(sorted((5, *shape))) for d, f in ((256, 256), (256, 768))
            for shape in ((d, f), (d // 8, f), (d, f // 8))}

  tc = TrainConfig(accum=1, remat="none")

  def bf16_stacks(quantize):
    with gpu_target.assume_cudnn():
      hlo = lower_step(cfg, tc, mesh, ctx=1024,
                       quantize=quantize)[0].compile().as_text()
    shapes = {tuple(map(int, dims.split(",")))
              for dims in re.findall(r"bf16\[([0-9,]+)\]", hlo)}
    return {shape for shape in shapes if tuple(sorted(shape)) in stacks}

  # The bf16 step holds each device's part of its stacks as passed, with
  # no copy in another axis order: a layer kernel splits the axis its
  # gather joins (`sharding.param_spec`; split on gate/up's out axis,
  # XLA:GPU kept them as [96, 5, 256] too, Llama-2-70B's 2 x 4.38 GiB).
  assert bf16_stacks("none") == {(5, 32, 256), (5, 32, 768), (5, 96, 256)}
  assert not bf16_stacks("nf4")


def test_a_4bit_step_is_the_step_of_its_dequantized_model():
  """LoRA+ over the demo checkpoint quantized to NF4 as it is read: a
  step's loss and the trained leaves after it are those of the same step
  on the bf16 model whose kernels are bitsandbytes' dequantization of
  the same bytes (bit for bit, tests/model/test_nf4.py)."""
  from longlora_jax.checkpoints.checkpoint import Checkpoint
  from longlora_jax.model import nf4
  from longlora_jax.training.step import initial_state, train_step
  demo = Checkpoint.open("demo")
  quantized = demo.params("bfloat16", quantize="nf4")
  kernel = quantized["layers"]["mlp"]["up_proj"]["kernel"]
  assert isinstance(kernel, nf4.NF4Tensor) and kernel.packed.dtype == np.uint8
  dequantized = jax.jit(lora.merge)(quantized)
  assert dequantized["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
  tc = dataclasses.replace(TC, dtype="bfloat16", lr=1e-3)
  ids = np.random.default_rng(0).integers(0, demo.config.vocab_size, (1, 1, 32))
  batch = {"input_ids": jnp.asarray(ids, jnp.int32)}
  runs = []
  for params in (quantized, dequantized):
    state, metrics = jax.jit(lambda s, b: train_step(
        s, b, config=demo.config, tc=tc))(initial_state(params, tc), batch)
    runs.append((metrics["loss"], state.trainable))
  (loss, trained), (want, want_trained) = runs
  np.testing.assert_allclose(loss, want, rtol=2e-3)
  _assert_trees_close(trained, want_trained, rtol=2e-2, atol=2e-4)


# Family -> context to train at: twice its own, past every sliding window
# (8 tokens in hf_models.FAMILY_CONFIGS), so the local layers cut keys.
DEGENERATE_S2 = {"olmo2": 64, "phi3": 64, "gemma2": 64, "gemma3_text": 64}


@pytest.mark.parametrize("name", sorted(DEGENERATE_S2))
def test_one_group_s2_step_is_the_full_attention_step(tiny_hf, name):
  # S²-Attn with one unshifted group per head (--group-ratio 1, --s2-variant
  # none) is full attention on the global layers; local layers keep their
  # window under both. So the LoRA+ step of each must be the same step.
  # The first loss is transformers' (B = 0 at step 0): windows, caps and
  # the extended RoPE are the model's, not one our two paths share.
  directory, _ = tiny_hf(name)
  base = Checkpoint.open(directory)
  ctx = DEGENERATE_S2[name]
  ids = hf_models.random_ids(base.config.vocab_size, 1, ctx, seed=2)
  batch = {"input_ids": jnp.asarray(ids[None], jnp.int32)}
  mesh = make_mesh("fsdp=1", jax.devices()[:1])
  runs = {}
  for attention in ({"group_ratio": 1.0, "s2_variant": "none"},
                    {"attention": "full"}):
    spec = make_spec({"ckpt": str(directory), "ctx": ctx, "dtype": "float32",
                      "remat": "none", "lr": 1e-2, "warmup": 0, "eps": 1e-3,
                      "lora_rank": 4, **attention}, task="extend",
                     base_config=base.config.to_hf_dict())
    config = target_config(spec, base.config)
    state = initial_run_state(spec, base.params("float32"), mesh)
    step, s_shard, b_shard = jit_train_step(config, spec.recipe, mesh,
                                            state, batch)
    state = jax.device_put(state, s_shard)
    losses = []
    for _ in range(2):  # the second step's gradients reach LoRA's A
      state, metrics = step(state, jax.device_put(batch, b_shard))
      losses.append(float(metrics["loss"]))
    runs[spec.recipe.attention.kind] = losses, state.trainable
  (s2_losses, s2), (full_losses, full) = runs["s2"], runs["full"]
  np.testing.assert_allclose(s2_losses, full_losses, rtol=1e-6)
  flat_s2 = jax.tree_util.tree_leaves_with_path(s2)
  # Updates are O(lr = 1e-2); Adam turns float32 rounding of the two
  # attention paths into ~1e-7 of them.
  for (path, x), y in zip(flat_s2, jax.tree.leaves(full)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  names = {jax.tree_util.keystr(path) for path, _ in flat_s2}
  assert any("embed" in n for n in names), names
  assert any("norm" in n for n in names), names
  assert any(".b" in n for n in names), names

  reference = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32,
      rope_parameters=config.to_hf_dict()["rope_parameters"],
      max_position_embeddings=config.max_position_embeddings).eval()
  with torch.no_grad():
    want = reference(torch.tensor(ids), labels=torch.tensor(ids)).loss.item()
  np.testing.assert_allclose(full_losses[0], want, rtol=1e-5)
