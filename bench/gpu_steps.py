"""`eval.gpu_check`'s train and generation sections: the LoRA+ S²-Attn
step of Llama-2 7B's layers (4 of them, or all 32), offloaded or not,
generation on the whole model, and the compile-only plan of the 4-layer
step (`gpu_sections` says what a section is)."""

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import timing
from bench.gpu_kernels import on_gpu, run_json
from longlora_jax.attention.dispatch import AttentionSpec
from longlora_jax.model.config import LlamaConfig, preset
from longlora_jax.model.flops import peak_flops, step_flops
from longlora_jax.model.llama import init_params
from longlora_jax.parallel.sharding import make_mesh
from longlora_jax.perf import memory_search
from longlora_jax.training.recipe import TrainConfig
from longlora_jax.training.step import (OffloadedStep, initial_state,
                                        jit_train_step)

# The step `train_*` runs: Llama-2 7B's layer with fewer layers, LoRA+.
LAYERS = 4
CTXS, SMOKE_CTXS = (8192, 32768), (256,)
# The whole model (`*_7b`, all 32 layers): the train step at these
# contexts, the offloaded one at OFFLOAD_CTX (its 50 GiB of pinned layer
# inputs fit a 128 GiB host), generation after a GENERATE_PROMPT prompt.
WHOLE_CTXS, OFFLOAD_CTX, GENERATE_PROMPT = (32768, 102400), 204800, 100000


def _model(smoke, layers=LAYERS):
  """Llama-2 7B's layers, `layers` of them (None: all 32); a tiny model in
  smoke mode."""
  if smoke:
    return LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                       num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=128)
  config = preset("llama2-7b")
  return dataclasses.replace(config, num_hidden_layers=layers or
                             config.num_hidden_layers)


def _train(implementation, smoke, save, offloads=("none",), ctxs=None,
           layers=LAYERS, repeats=4):
  """Each context's LoRA+ S²-Attn step, batch 1, timed over `repeats`
  steps after a warm-up one."""
  base = _model(smoke, layers)
  device = jax.devices()[0]
  init = jax.jit(lambda key: init_params(base, key, dtype=jnp.bfloat16))
  runs = []
  for ctx, offload in itertools.product(
      ctxs or (SMOKE_CTXS if smoke else CTXS), offloads):
    config = base.with_context(ctx)
    tc = TrainConfig(attention=AttentionSpec(implementation=implementation),
                     accum=1, warmup=0, offload=offload)
    # Fresh weights per context: the step donates (deletes) the state's.
    state = initial_state(init(jax.random.key(0)), tc)
    rng = np.random.default_rng(ctx)
    batches = [{"input_ids": jnp.asarray(
        rng.integers(0, config.vocab_size, (1, 1, ctx)), jnp.int32)}
        for _ in range(2)]
    mesh = make_mesh("fsdp=-1", jax.devices()[:1])
    step, s_shard, b_shard = jit_train_step(config, tc, mesh, state,
                                            batches[0])
    state = jax.device_put(state, s_shard)
    batches = [jax.device_put(b, b_shard) for b in batches]
    t0 = time.time()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = round(time.time() - t0, 1)
    if isinstance(compiled, OffloadedStep):
      planned = memory_search.with_update(
          memory_search.program_gib(compiled.grads_fn),
          memory_search.program_gib(compiled.update_fn),
          sum(x.nbytes for x in jax.tree.leaves(state.frozen)) / 2**30)
    else:
      planned = memory_search.program_gib(compiled)
    calls = itertools.count()  # the warm-up takes batch 0, then 1, 0, ...

    def train_step():
      nonlocal state
      state, m = compiled(state, batches[next(calls) % 2])
      return float(m["loss"])  # waits for the step
    timed = timing.timed(train_step, 1 if smoke else repeats)
    losses, seconds = [timed.first, *timed.results], timed.median_s
    flops = step_flops(config, ctx, batch=1, group_size=ctx // 4)
    peak = peak_flops(device)
    runs.append(dict(
        implementation=implementation, ctx=ctx, offload=offload,
        layers=config.num_hidden_layers,
        compile_s=compile_s, step_s=seconds, tokens_per_s=ctx / seconds,
        mfu=flops / seconds / peak if peak else None, losses=losses,
        finite=bool(np.all(np.isfinite(losses))),
        peak_gib=(timing.peak_bytes() or 0) / 2**30,
        planned_gib=planned["total"],
        planned_host_gib=planned["host_temporaries"]))
    print(json.dumps(runs[-1]), flush=True)
    del state
    save(dict(runs=runs))
  return dict(runs=runs, note="peak_gib: the process's running maximum "
              "(contexts in increasing order)")


def train_pallas(smoke, save):
  return _train("pallas_interpret" if smoke else "pallas", smoke, save)


def train_cudnn(smoke, save):
  return _train("cudnn" if on_gpu() else "dense", smoke, save)


def train_offload(smoke, save):
  """The step at the longest context as it is and with the layer inputs and
  AdamW's masters and moments in pinned host memory: what offloading costs
  in time and saves in device memory, against the plans. The device's peak
  is the process's running maximum, so the offloaded step runs first."""
  return _train("cudnn" if on_gpu() else "dense", smoke, save,
                offloads=("activations,optimizer", "none"),
                ctxs=(SMOKE_CTXS if smoke else CTXS)[-1:])


def train_7b(smoke, save):
  """The whole 32-layer model's step at 32k and 100k, attention "auto"
  (what `train.extend` runs), timed over 2 steps: each takes seconds."""
  return _train("auto", smoke, save, ctxs=SMOKE_CTXS if smoke else
                WHOLE_CTXS, layers=None, repeats=2)


def train_7b_offload(smoke, save):
  """The whole model past one GPU's memory: the layer inputs in pinned host
  memory (`--offload activations`), one timed step at OFFLOAD_CTX."""
  return _train("auto", smoke, save, offloads=("activations",),
                ctxs=SMOKE_CTXS if smoke else (OFFLOAD_CTX,), layers=None,
                repeats=1)


def generate_7b(smoke, save):
  """`bench.generate` on the whole model: prefill through the KV-cache
  kernel, decode tokens/s and the device's peak (plan: `eval.memory_plan
  --eval`)."""
  if smoke:
    args = ["--hidden", "256", "--layers", "2", "--heads", "4", "--vocab",
            "512", "--prompts", str(SMOKE_CTXS[0]), "--decode", "4",
            "--chunk", "64"]
  else:
    args = ["--model", "llama2-7b", "--prompts", str(GENERATE_PROMPT),
            "--decode", "32"]
  # Its plan (61.9 GiB at 100k) passes the 60 GiB of an 80 GB GPU that JAX
  # takes by default; 0.9 gives it 72.
  return run_json("bench.generate", args, env={
      "XLA_PYTHON_CLIENT_MEM_FRACTION": ".9", **os.environ})


def plan(smoke, save):
  """The compile-only plan (XLA:GPU for an H100, or XLA:CPU in smoke) of
  the 7B-shaped step `train_*` measured at its longest context."""
  with tempfile.TemporaryDirectory() as tmp:
    _model(smoke).save(tmp)
    ctx = str((SMOKE_CTXS if smoke else CTXS)[-1])
    target = "cpu" if smoke else "h100"
    # One device: memory_plan sets the CPU device count itself.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-m", "eval.memory_plan", "--model", tmp, "--ctx",
         ctx, "--mesh", "fsdp=1", "--target", target, "--json"],
        check=True, capture_output=True, text=True, env=env)
    return json.loads(proc.stdout)
