"""The sections of `eval.gpu_check`, each run in its own process:
`section(smoke, save) -> dict` (JSON-able); `save(partial)` records what
is measured so far, which is what remains if the section runs out of time."""

import dataclasses
import functools
import importlib.metadata
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import timing
from longlora_jax.perf import gpu_target, memory_search
from longlora_jax.attention.context import s2_halos
from longlora_jax.attention.cudnn_grouped import cudnn_s2_attention
from longlora_jax.attention.dispatch import (FUSED_PREFERENCE, AttentionSpec,
                                             fused_for, s2_attention)
from longlora_jax.attention.pallas import grouped as pallas_grouped
from longlora_jax.model.config import LlamaConfig, preset
from longlora_jax.model.flops import peak_flops, step_flops
from longlora_jax.model.llama import init_params
from longlora_jax.parallel.sharding import make_mesh
from longlora_jax.training.recipe import TrainConfig
from longlora_jax.training.step import (OffloadedStep, initial_state,
                                        jit_train_step)
from tests.references import attention as ref

# The step `train_*` runs: Llama-2 7B's layer with fewer layers, LoRA+.
LAYERS = 4
CTXS, SMOKE_CTXS = (8192, 32768), (256,)
PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax",
            "optax", "orbax-checkpoint", "numpy", "transformers", "torch",
            "triton", "jax-triton", "nvidia-cudnn-cu12", "nvidia-cudnn-cu13")


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def env(smoke, save):
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  device = jax.devices()[0]
  try:
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
         "clocks.max.sm,power.limit", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
  except (OSError, subprocess.SubprocessError) as e:
    smi = repr(e)
  return dict(python=sys.version.split()[0], packages=versions,
              backend=jax.default_backend(), jax=jax.__version__,
              device_kind=device.device_kind, devices=len(jax.devices()),
              compute_capability=getattr(device, "compute_capability", None),
              memory_stats=device.memory_stats(), nvidia_smi=smi,
              peak_bf16_flops=peak_flops(device),
              pallas_available=pallas_grouped.AVAILABLE,
              compile_only_available=gpu_target.AVAILABLE,
              fused_preference=list(FUSED_PREFERENCE),
              auto=fused_for(128, jnp.bfloat16) or "dense/chunked")


# ---- correctness ----

def _inputs(shape, dtype, seed):
  B, T, N, K, H = shape
  q, k, v = ref.random_qkv(np.random.default_rng(seed), B, T, N, K, H)
  w = np.random.default_rng(seed + 1).standard_normal((B, T, N, H))
  return (*(jnp.asarray(x, dtype) for x in (q, k, v)),
          jnp.asarray(w, jnp.float32))


def _rel(got, want):
  got, want = (np.asarray(x, np.float64) for x in (got, want))
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _compare(fn, options, shape, dtype, want_fn, tol, precision=None):
  """`fn` (value and grads) against `want_fn(q, k, v, w)`: relative errors
  of out, dq, dk, dv and whether all are within `tol`."""
  q, k, v, w = _inputs(shape, dtype, seed=sum(shape))
  with jax.default_matmul_precision(precision):
    out, grads = jax.block_until_ready(
        ref.value_and_grads(fn, options, q, k, v, w))
  want_out, want_grads = want_fn(q, k, v, w)
  errs = dict(zip(("out", "dq", "dk", "dv"), map(
      _rel, (out, *grads), (want_out, *want_grads))))
  finite = all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *grads))
  return dict(rel_err=errs, tol=tol,
              ok=finite and max(errs.values()) <= tol and all(
                  g.dtype == dtype for g in (out, *grads)))


def _dense_reference(G, variant):
  """S²-Attn by reshape/roll in float32 at "highest" precision."""
  def want(q, k, v, w):
    up = lambda x: x.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
      return ref.value_and_grads(
          s2_attention, (("group_size", G), ("variant", variant),
                         ("implementation", "dense")), up(q), up(k), up(v), w)
  return want


def _float64_reference(G, variant):
  def want(q, k, v, w):
    B, T, N = q.shape[:3]
    keys = ref.s2_head_keys(T, G, N, variant)
    up = lambda x: np.asarray(x.astype(jnp.float32))
    return ref.attention(up(q), up(k), up(v),
                         ref.mask_from_keys(keys, None, B), np.asarray(w))
  return want


def _context_windows(q_BTNH, k_BTKH, v_BTKH, *, group_size, variant,
                     segment_ids_BT=None, slices=8, interpret=False):
  """"flash" S²-Attn as `slices` devices of a context axis compute it, one
  after another on this device: each slice's queries over its window
  [halo; own] (`pallas_window_attention`; the first slice's halo wraps
  from the end and must stay unseen), outputs concatenated."""
  if variant != "flash":
    raise ValueError("the window check runs the flash variant")
  seq = q_BTNH.shape[1]
  T, G = seq // slices, group_size
  W = max(s2_halos(seq, slices, G))
  outs = []
  for c in range(slices):
    window = jnp.arange(c * T - W, (c + 1) * T) % seq
    outs.append(pallas_grouped.pallas_window_attention(
        q_BTNH[:, c * T:(c + 1) * T], k_BTKH[:, window], v_BTKH[:, window],
        q_start=W, origin=c * T - W, group_size=G,
        segment_ids_BT=segment_ids_BT, interpret=interpret))
  return jnp.concatenate(outs, axis=1)


def _checks(smoke):
  """(name, fn, options, shape, dtype, reference, tol, precision), what
  matters most first."""
  bf16, f32 = jnp.bfloat16, jnp.float32
  interpret = (("interpret", True),) if smoke or not _on_gpu() else ()
  impls = {
      "pallas": (pallas_grouped.pallas_s2_attention, interpret),
      "cudnn": (cudnn_s2_attention,
                () if _on_gpu() else (("implementation", "xla"),)),
  }
  # Context parallelism's kernel, 8 slices emulated on one GPU ("flash").
  window = {"pallas_window": (_context_windows, interpret)}
  # (B, T, N, K, H), G: Llama-2 7B heads at 8192 tokens, G = seq / 4.
  big = ((1, 256, 4, 4, 64), 64) if smoke else ((1, 8192, 32, 32, 128), 2048)
  gqa = ((1, 256, 4, 2, 128), 64) if smoke else ((1, 8192, 32, 8, 128), 2048)
  pad = ((1, 200, 4, 4, 64), 50) if smoke else ((1, 6000, 8, 8, 128), 1500)
  small = ((1, 128, 4, 2, 64), 32) if smoke else ((1, 1024, 8, 2, 128), 256)

  def check(impl, label, case, dtype, variant, reference, tol=2e-2,
            precision=None):
    fn, opts = {**impls, **window}[impl]
    (shape, G), name = case, f"{impl}_{label}_{jnp.dtype(dtype).name}"
    return (f"{name}_{variant}", fn,
            (("group_size", G), ("variant", variant)) + opts, shape, dtype,
            reference(G, variant), tol, precision)

  return [
      *(check(i, "7b", big, bf16, "flash", _dense_reference) for i in impls),
      *(check(i, "small", small, bf16, v, _float64_reference)
        for i in impls for v in ("flash", "roll")),
      *(check(i, "7b", big, bf16, "roll", _dense_reference) for i in impls),
      *(check(i, "gqa", gqa, bf16, "flash", _dense_reference) for i in impls),
      *(check(i, "padded", pad, bf16, "flash", _dense_reference)
        for i in impls),
      check("pallas", "7b", big, f32, "flash", _dense_reference, 1e-4,
            "highest"),
      check("pallas", "padded", pad, f32, "roll", _dense_reference, 1e-4,
            "highest"),
      check("pallas_window", "gqa", gqa, bf16, "flash", _dense_reference),
      check("pallas_window", "small", small, f32, "flash",
            _float64_reference, 1e-4, "highest"),
  ]


def correctness(smoke, save):
  # Smoke runs check; on a busy CPU they take what they take.
  deadline = math.inf if smoke else time.time() + 180
  results = []
  for name, fn, options, shape, dtype, want, tol, precision in _checks(smoke):
    if time.time() > deadline:
      results.append(dict(name=name, status="skipped: time"))
      continue
    t0 = time.time()
    try:
      r = _compare(fn, options, shape, dtype, want, tol, precision)
      r = dict(name=name, status="pass" if r.pop("ok") else "FAIL", **r)
    except Exception as e:  # noqa: BLE001 - a check that raises fails
      r = dict(name=name, status="ERROR", error=f"{type(e).__name__}: "
               f"{str(e)[:500]}")
    r["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(r), flush=True)
    results.append(r)
    save(dict(checks=results))
  return dict(checks=results, dispatch=_dispatch(smoke))


def _dispatch(smoke):
  """What "auto" puts into a compiled S²-Attn step, by head_dim and dtype."""
  found = {}
  for H, dtype, packed in ((128, jnp.bfloat16, False), (128, jnp.float32,
                                                        False),
                           (96, jnp.bfloat16, False), (128, jnp.bfloat16,
                                                       True)):
    q = jax.ShapeDtypeStruct((1, 512, 8, H), dtype)
    seg = jnp.zeros((1, 512), jnp.int32) if packed else None
    hlo = jax.jit(lambda q, k, v: s2_attention(
        q, k, v, segment_ids_BT=seg)).lower(q, q, q).as_text()
    kind = ("pallas" if "triton" in hlo else "cudnn" if "cudnn" in hlo
            else "xla")
    found[f"h{H}_{jnp.dtype(dtype).name}{'_packed' * packed}"] = dict(
        compiled=kind, expected=fused_for(H, dtype, packed=packed) or "xla")
  return found


# ---- train steps ----

def _model(smoke):
  """Llama-2 7B's layers, `LAYERS` of them; a tiny model in smoke mode."""
  if smoke:
    return LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                       num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=128)
  return dataclasses.replace(preset("llama2-7b"), num_hidden_layers=LAYERS)


def _train(implementation, smoke, save, offloads=("none",), ctxs=None):
  base = _model(smoke)
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
    timed = timing.timed(train_step, 1 if smoke else 4)
    losses, seconds = [timed.first, *timed.results], timed.median_s
    flops = step_flops(config, ctx, batch=1, group_size=ctx // 4)
    peak = peak_flops(device)
    stats = device.memory_stats() or {}
    runs.append(dict(
        implementation=implementation, ctx=ctx, offload=offload,
        layers=config.num_hidden_layers,
        compile_s=compile_s, step_s=seconds, tokens_per_s=ctx / seconds,
        mfu=flops / seconds / peak if peak else None, losses=losses,
        finite=bool(np.all(np.isfinite(losses))),
        peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
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
  return _train("cudnn" if _on_gpu() else "dense", smoke, save)


def train_offload(smoke, save):
  """The step at the longest context as it is and with the layer inputs and
  AdamW's masters and moments in pinned host memory: what offloading costs
  in time and saves in device memory, against the plans. The device's peak
  is the process's running maximum, so the offloaded step runs first."""
  return _train("cudnn" if _on_gpu() else "dense", smoke, save,
                offloads=("activations,optimizer", "none"),
                ctxs=(SMOKE_CTXS if smoke else CTXS)[-1:])


# ---- attention benchmark, tile sweep, memory plan ----

def bench(smoke, save):
  with tempfile.TemporaryDirectory() as tmp:
    result = f"{tmp}/bench.json"
    if smoke:
      args = ["--seqs", "256", "--methods", "pallas", "s2_dense", "dense",
              "--heads", "4", "--head-dim", "64", "--interpret",
              "--repeats", "1"]
    else:
      args = ["--seqs", "8192", "16384", "32768", "--methods", "pallas",
              "s2_cudnn", "full_cudnn", "--heads", "32", "--head-dim", "128",
              "--dtype", "bfloat16", "--time-max-seq", "32768",
              "--dense-max-seq", "32768", "--repeats", "5"]
    subprocess.run([sys.executable, "-m", "bench.attention", *args,
                    "--forward", "--json", result], check=True)
    return json.loads(open(result).read())


def sweep(smoke, save):
  """Forward + backward time of the Pallas kernel per tile configuration,
  each checked against the default's output and gradients."""
  shape = (1, 256, 4, 4, 64) if smoke else (1, 32768, 32, 32, 128)
  G = shape[1] // 4
  base = pallas_grouped.default_config(shape[4])
  changes = [{}, dict(block_k_dkv=128), dict(block_q_dkv=64),
             dict(block_k_dq=64), dict(num_stages_bwd=3),
             dict(num_warps_bwd=4, num_stages_bwd=3),
             dict(block_q=64, block_k=64), dict(block_k=128)]
  q, k, v, w = _inputs(shape, jnp.bfloat16, seed=0)
  configs, reference = [], None
  deadline = math.inf if smoke else time.time() + 45
  for change in changes[:2] if smoke else changes:
    if time.time() > deadline:
      break
    config = dataclasses.replace(base, **change)
    fn = jax.jit(functools.partial(
        ref.value_and_grads, pallas_grouped.pallas_s2_attention,
        (("group_size", G), ("config", config), ("interpret", smoke))))
    entry = dict(changes=change, config=dataclasses.asdict(config))
    try:
      timed = timing.timed(lambda: fn(q, k, v, w), 1 if smoke else 5)
      got = timed.first
      reference = reference or got
      entry["max_rel_err_vs_default"] = max(
          map(_rel, jax.tree.leaves(got), jax.tree.leaves(reference)))
      entry["time_s"] = timed.median_s
    except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
      entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(entry), flush=True)
    configs.append(entry)
    save(dict(shape=shape, group_size=G, configs=configs))
  return dict(shape=shape, group_size=G, configs=configs)


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
