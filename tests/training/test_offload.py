"""What waits in pinned host memory instead of the device's (`--offload`):
the layer inputs between the forward and backward pass, and AdamW's moments
between updates. Either way the step is the same step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from longlora_jax import LlamaConfig, LongLoraError
from longlora_jax.checkpoints.checkpoint import Checkpoint, param_shardings
from longlora_jax.checkpoints.hf import save_hf
from longlora_jax.parallel.sharding import make_mesh
from longlora_jax.perf import gpu_target
from longlora_jax.training.options import make_spec
from longlora_jax.training.recipe import TrainConfig, target_config
from longlora_jax.training.step import (OffloadedStep, initial_run_state,
                                        jit_train_step, lower_step, params_of)
from tests.references import hf_models
from tests.references.hf_models import torch  # None without PyTorch


@pytest.mark.parametrize("offload,devices", [("none", 1), ("optimizer", 1),
                                             ("optimizer", 2)])
def test_steps_are_torch_adamw_steps_wherever_the_moments_wait(
    tiny_hf, tmp_path, offload, devices):
  # Full fine-tuning of a transformers Llama, two steps: torch.optim.AdamW
  # after clipping the gradients' global norm to 1 is the reference for the
  # fused step and for the one whose masters and moments live in pinned host
  # memory, on one device and sharded over two.
  hf_models.require("torch")
  directory, _ = tiny_hf("gqa")
  base = Checkpoint.open(directory)
  ids = hf_models.random_ids(base.config.vocab_size, 2, 32, seed=4)
  spec = make_spec({"ckpt": str(directory), "ctx": 32, "dtype": "float32",
                    "mode": "full", "attention": "full", "remat": "none",
                    "lr": 1e-2, "warmup": 0, "eps": 1e-3, "accum": 1,
                    "offload": offload}, task="extend",
                   base_config=base.config.to_hf_dict())
  config = target_config(spec, base.config)
  mesh = make_mesh(f"fsdp={devices}", jax.devices()[:devices])
  state = initial_run_state(spec, base.params(
      "float32", param_shardings(base.config, mesh)), mesh)
  batch = {"input_ids": jnp.asarray(ids[None], jnp.int32)}
  step, s_shard, b_shard = jit_train_step(config, spec.recipe, mesh, state,
                                          batch)
  assert isinstance(step, OffloadedStep) == (offload == "optimizer")
  for _ in range(2):
    state, metrics = step(state, jax.device_put(batch, b_shard))
  kinds = {x.sharding.memory_kind
           for x in jax.tree.leaves((state.trainable, state.opt_state))}
  assert kinds == {"pinned_host" if offload == "optimizer" else "device"}
  save_hf(config, params_of(state), tmp_path)
  ours = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32).state_dict()

  model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32)
  adamw = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.999),
                            eps=1e-3, weight_decay=0.0)
  for _ in range(2):
    loss = model(torch.tensor(ids), labels=torch.tensor(ids)).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    adamw.step()
    adamw.zero_grad()
  np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-5)
  want = model.state_dict()
  assert set(ours) == set(want)
  for name, value in want.items():
    np.testing.assert_allclose(ours[name].numpy(), value.numpy(), rtol=1e-4,
                               atol=2e-6, err_msg=name)


def test_the_offloaded_optimizer_leaves_the_gradients_program():
  # XLA's memory analysis of the two programs: the gradients' arguments are
  # the fused step's less exactly the optimizer state's bytes, and the
  # gradients take the buffers of the trained leaves' device copy; the
  # update takes the masters, their moments and their gradients.
  cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=256)
  mesh = make_mesh("fsdp=1", jax.devices()[:1])
  fused, state = lower_step(cfg, TrainConfig(accum=1), mesh, ctx=256)
  split, _ = lower_step(cfg, TrainConfig(accum=1, offload="optimizer"), mesh,
                        ctx=256)
  fused, split = fused.compile(), split.compile()
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize
                            for x in jax.tree.leaves(tree))
  args = lambda c: c.memory_analysis().argument_size_in_bytes
  assert args(fused) - args(split.grads_fn) == nbytes(state.opt_state)
  assert split.grads_fn.memory_analysis().alias_size_in_bytes == nbytes(
      state.trainable)
  assert args(split.update_fn) == (nbytes(state.opt_state) + nbytes(state.step)
                                   + 2 * nbytes(state.trainable))


@pytest.mark.skipif(not gpu_target.AVAILABLE,
                    reason="needs JAX's CUDA plugin (requirements-test.txt)")
def test_offloaded_step_keeps_the_layer_inputs_in_host_memory():
  # XLA:GPU for one compile-only H100: with --offload activations the stack
  # of layer inputs [layers, batch, seq, hidden] lives in host memory
  # (memory space S(5)) and leaves the device's temporaries, where it was
  # the largest buffer (the rest is one layer's work at a time).
  cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
                    num_hidden_layers=4, num_attention_heads=2,
                    max_position_embeddings=2048)
  mesh = make_mesh("fsdp=1", gpu_target.devices("h100", 1))
  stack = 4 * 1 * 8192 * 256 * 2  # bf16

  def compiled(offload):
    tc = TrainConfig(accum=1, offload=offload)
    with gpu_target.assume_cudnn():
      return lower_step(cfg, tc, mesh, ctx=8192)[0].compile()

  kept, offloaded = compiled("none"), compiled("activations")
  on_host = r"bf16\[4,1,8192,256\]\{[0-9,]+:S\(5\)\}"
  assert not re.search(on_host, kept.as_text())
  assert re.search(on_host, offloaded.as_text())
  before, after = kept.memory_analysis(), offloaded.memory_analysis()
  assert before.host_temp_size_in_bytes == 0
  assert after.host_temp_size_in_bytes == stack
  assert before.temp_size_in_bytes - after.temp_size_in_bytes >= stack / 2


def test_offload_needs_full_remat():
  with pytest.raises(LongLoraError, match="needs --remat full, not dots"):
    TrainConfig(remat="dots", offload="activations")
  with pytest.raises(LongLoraError, match="needs --remat full, not dots"):
    TrainConfig(remat="dots", offload="activations,optimizer")
  with pytest.raises(LongLoraError, match="unknown offload"):
    TrainConfig(offload="weights")
  TrainConfig(remat="dots", offload="optimizer")  # the moments need no remat
  assert TrainConfig(offload="activations").remat_policy == "offload"
  assert TrainConfig(remat="dots").remat_policy == "dots"
