"""`eval.gpu_check`'s kernel sections: the fused S²-Attn paths against
references, what "auto" compiles, the attention benchmark and the Pallas
kernels' tile sweeps (`gpu_sections` says what a section is)."""

import dataclasses
import functools
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench import timing
from longlora_jax.attention.context import s2_halos
from longlora_jax.attention.cudnn_grouped import cudnn_s2_attention
from longlora_jax.attention.dispatch import fused_for, s2_attention
from longlora_jax.attention.pallas import grouped as pallas_grouped
from tests.references import attention as ref


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


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
                     segment_ids_BT=None, slices=8, interpret=False,
                     config=None):
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
        segment_ids_BT=segment_ids_BT, config=config, interpret=interpret))
  return jnp.concatenate(outs, axis=1)


def _checks(smoke):
  """(name, fn, options, shape, dtype, reference, tol, precision), what
  matters most first."""
  bf16, f32 = jnp.bfloat16, jnp.float32
  interpret = (("interpret", True),) if smoke or not on_gpu() else ()
  impls = {
      "pallas": (pallas_grouped.pallas_s2_attention, interpret),
      "cudnn": (cudnn_s2_attention,
                () if on_gpu() else (("implementation", "xla"),)),
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


def run_json(module, args, env=None) -> dict:
  """What `python -m module *args --json FILE` writes to FILE, run in a
  process of its own (which takes its own share of the GPU)."""
  with tempfile.TemporaryDirectory() as tmp:
    result = f"{tmp}/result.json"
    subprocess.run([sys.executable, "-m", module, *args, "--json", result],
                   check=True, env=env)
    return json.loads(Path(result).read_text())


def bench(smoke, save):
  if smoke:
    args = ["--seqs", "256", "--methods", "pallas", "s2_dense", "dense",
            "--heads", "4", "--head-dim", "64", "--interpret",
            "--repeats", "1"]
  else:
    args = ["--seqs", "8192", "16384", "32768", "--methods", "pallas",
            "s2_cudnn", "full_cudnn", "--heads", "32", "--head-dim", "128",
            "--dtype", "bfloat16", "--time-max-seq", "32768",
            "--dense-max-seq", "32768", "--repeats", "5"]
  return run_json("bench.attention", [*args, "--forward"])


# Tile changes from the default (`default_config`), one at a time: the
# quick sweep for every run, the wide one for work on the backward kernels.
# Each wide change compiles for sm_90a with no register spills
# (`bench.kernel_resources --sweep`; BENCHMARKS.md).
SWEEP = ({}, dict(block_k_dkv=128), dict(block_q_dkv=64), dict(block_k_dq=64),
         dict(num_stages_bwd=3), dict(num_warps_bwd=4, num_stages_bwd=3),
         dict(block_q=64, block_k=64), dict(block_k=128))
# (kernel, changes): the best change of each kernel's group is combined at
# the end.
SWEEP_WIDE = (
    ("dkv", dict(block_q_dkv=16)), ("dkv", dict(block_q_dkv=64)),
    ("dkv", dict(block_k_dkv=128)),
    ("dkv", dict(block_q_dkv=64, block_k_dkv=128)),
    ("dkv", dict(block_q_dkv=16, block_k_dkv=128)),
    ("dq", dict(block_k_dq=64)), ("dq", dict(block_k_dq=16)),
    ("dq", dict(block_q_dq=64)), ("dq", dict(block_q_dq=64, block_k_dq=64)),
    ("launch", dict(num_stages_bwd=1)), ("launch", dict(num_stages_bwd=3)),
    ("forward", dict(block_k=128)), ("forward", dict(block_q=64)),
    ("forward", dict(num_stages=2)), ("forward", dict(num_stages=4)),
)


def _time_configs(shape, changes, smoke, save, seconds, window=False,
                  earlier=(), reference=None):
  """Forward + backward time of the Pallas S² kernel (or, `window`, of the
  context-parallel window kernel over 8 slices) per configuration, each
  checked against `reference` (default: the first's output and gradients);
  `save` records them after the `earlier` ones. Returns the entries and
  the reference."""
  G = shape[1] // 4
  base = pallas_grouped.default_config(shape[4])
  fn = _context_windows if window else pallas_grouped.pallas_s2_attention
  q, k, v, w = _inputs(shape, jnp.bfloat16, seed=0)
  configs = []
  deadline = math.inf if smoke else time.time() + seconds
  for change in changes:
    if time.time() > deadline:
      break
    config = dataclasses.replace(base, **change)
    run = jax.jit(functools.partial(
        ref.value_and_grads, fn, (("group_size", G), ("config", config),
                                  ("interpret", smoke)) + (
                                      (("variant", "flash"),) if window
                                      else ())))
    entry = dict(changes=change, config=dataclasses.asdict(config),
                 kernel="window" if window else "s2")
    try:
      timed = timing.timed(lambda: run(q, k, v, w), 1 if smoke else 5)
      got = timed.first
      reference = reference or got
      entry["max_rel_err_vs_default"] = max(
          map(_rel, jax.tree.leaves(got), jax.tree.leaves(reference)))
      entry["time_s"] = timed.median_s
    except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
      entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(entry), flush=True)
    configs.append(entry)
    save(dict(shape=shape, group_size=G, configs=[*earlier, *configs]))
  return configs, reference


def _sweep_shape(smoke):
  return (1, 256, 4, 4, 64) if smoke else (1, 32768, 32, 32, 128)


def sweep(smoke, save):
  """The quick tile sweep (`SWEEP`) of the S² kernel at 32k."""
  shape = _sweep_shape(smoke)
  configs, _ = _time_configs(shape, SWEEP[:2] if smoke else SWEEP, smoke,
                             save, seconds=45)
  return dict(shape=shape, group_size=shape[1] // 4, configs=configs)


def sweep_wide(smoke, save):
  """`SWEEP_WIDE`'s changes one at a time, then the best change of each
  kernel combined; the default and that combination also in the window
  kernel. Goal: forward + backward <= 16 ms in both at 32k (the grouped
  cuDNN path's 15.33 ms on an H100)."""
  shape = _sweep_shape(smoke)
  wide = SWEEP_WIDE[:2] if smoke else SWEEP_WIDE
  configs, default_s2 = _time_configs(
      shape, [{}] + [c for _, c in wide], smoke, save, seconds=200)
  default = configs[0].get("time_s", math.inf)
  best = {}  # kernel -> (time, change)
  for (kernel, change), entry in zip(wide, configs[1:]):
    t = entry.get("time_s", math.inf)
    if t < min(default, best.get(kernel, (math.inf,))[0]):
      best[kernel] = (t, change)
  combined = {k: v for _, change in best.values() for k, v in change.items()}
  if len(best) > 1:
    configs += _time_configs(shape, [combined], smoke, save, seconds=40,
                             earlier=configs, reference=default_s2)[0]
  windows, _ = _time_configs(shape, [{}] + [combined] * bool(combined),
                             smoke, save, seconds=60, window=True,
                             earlier=configs)
  return dict(shape=shape, group_size=shape[1] // 4, configs=configs + windows,
              best=combined)
