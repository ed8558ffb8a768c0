"""Attention benchmark: forward (+ backward) time, FLOP rate and memory.

Compares dense and chunked (flash-style, pure JAX) full attention,
S²-Attn with dense and chunked groups, the fused Pallas S²-Attn
kernel, and on GPU cuDNN baselines, at growing sequence lengths on the
current backend. Memory is XLA's compiled temporary buffer size
(`memory_analysis().temp_size_in_bytes`), which needs no allocation, so it is
reported beyond the lengths that are timed; on GPU also the allocator's peak
(`memory_stats()["peak_bytes_in_use"]`, per measurement with `--isolate`).

  python -m bench.attention --seqs 1024 2048 4096 --json out.json
  python -m bench.attention --gpu-suite --json gpu.json   # on a GPU

Methods:
  dense, chunked       full attention, dense / chunked
  s2_dense, s2_chunked `s2_attention` (--variant) with dense / chunked groups
  pallas               the fused Pallas S²-Attn kernel (`pallas.grouped`); off
                       GPU only with --interpret (Pallas interpreter, slow)
  pallas_causal        the same kernel with one group (causal attention)
  s2_cudnn             S²-Attn as grouped cuDNN flash attention
                       (`attention.cudnn_grouped`, --variant); GPU only
  full_cudnn           causal cuDNN attention over the whole sequence; GPU
FLOP/s counts only the pairs each method must attend
(`attention_flops(..., group_size=G, variant=...)`: no recomputation, no
masked-out work).
"""

import argparse
import datetime
import time
from pathlib import Path

from bench import timing
from longlora_jax.core import cli


METHODS = ("dense", "chunked", "s2_dense", "s2_chunked", "pallas",
           "pallas_causal", "s2_cudnn", "full_cudnn")
DEFAULT_METHODS = ("dense", "chunked", "s2_dense", "s2_chunked")
GPU_SUITE = dict(seqs=[8192, 16384, 32768, 65536], heads=32, head_dim=128,
                 dtype="bfloat16", forward=True, isolate=True,
                 methods=["pallas", "s2_cudnn", "s2_dense", "full_cudnn",
                          "pallas_causal"],
                 time_max_seq=65536, dense_max_seq=65536)


def parse_args(argv=None):
  p = cli.Parser(__doc__)
  p.add_argument("--seqs", type=cli.count, nargs="+",
                 default=[1024, 2048, 4096, 8192, 16384],
                 help="sequence lengths")
  p.add_argument("--methods", nargs="+", choices=METHODS,
                 default=list(DEFAULT_METHODS))
  p.add_argument("--batch", type=cli.count, default=1)
  cli.option(p, "--heads", default=4)
  cli.option(p, "--kv-heads")
  cli.option(p, "--head-dim", default=64)
  cli.option(p, "--dtype", default=None, choices=("float32", "bfloat16"),
             help="q, k and v (default: bfloat16 on GPU, float32 on CPU)")
  p.add_argument("--group-ratio", type=cli.fraction, default=0.25,
                 help="S²-Attn group size / seq (LongLoRA: 1/4)")
  p.add_argument("--group-size", type=cli.integer(2), default=None,
                 help="a fixed S²-Attn group size instead of the ratio")
  p.add_argument("--variant", default="flash", choices=("flash", "roll"),
                 help="S²-Attn groups of every S² method")
  p.add_argument("--block", type=cli.count, default=None,
                 help="chunked block size (default: 256 on a CPU, 512 else)")
  p.add_argument("--forward", action="store_true",
                 help="also time the forward pass alone")
  p.add_argument("--interpret", action="store_true",
                 help="run the pallas methods in the Pallas interpreter "
                      "(any backend; for checking the script on CPU)")
  p.add_argument("--isolate", action="store_true",
                 help="one process per measurement, so the allocator's peak "
                      "memory is per measurement (GPU)")
  p.add_argument("--gpu-suite", action="store_true",
                 help="the GPU comparison: " + ", ".join(
                     f"{k}={v}" for k, v in GPU_SUITE.items())
                 + " (explicit flags after it still apply)")
  p.add_argument("--time-max-seq", type=cli.count, default=8192,
                 help="longer sequences: memory only (compiled, not run)")
  p.add_argument("--dense-max-seq", type=cli.count, default=4096,
                 help="longer sequences: dense attention memory only")
  p.add_argument("--repeats", type=cli.count, default=3,
                 help="timed runs after a warm-up; the median is reported")
  p.add_argument("--json", metavar="OUT", type=Path,
                 help="write the results here")
  args = p.parse_args(argv)
  if args.gpu_suite:
    # The suite's values, except where a flag was given explicitly.
    explicit = p.parse_args(argv, namespace=argparse.Namespace(
        **{k: None for k in vars(args)}))
    for key, value in GPU_SUITE.items():
      if getattr(explicit, key) in (None, False):
        setattr(args, key, value)
  return args


def group_size(method: str, seq: int, args) -> int | None:
  if not (method.startswith("s2") or method == "pallas"):
    return None
  return args.group_size or int(seq * args.group_ratio)


def skip_reason(method: str, backend: str, args) -> str | None:
  if method.endswith("cudnn") and backend != "gpu":
    return "cuDNN attention needs a CUDA GPU"
  if method.startswith("pallas"):
    from longlora_jax.attention.pallas import grouped
    if not grouped.AVAILABLE:
      return f"Pallas Triton is not importable: {grouped.IMPORT_ERROR}"
    if backend != "gpu" and not args.interpret:
      return "the Pallas Triton kernel needs a GPU (or --interpret)"
  return None


def attention_for(method: str, seq: int, args):
  import functools

  from longlora_jax.attention.chunked import chunked_causal_attention
  from longlora_jax.attention.cudnn_grouped import (cudnn_causal_attention,
                                                     cudnn_s2_attention)
  from longlora_jax.attention.dense import dense_causal_attention
  from longlora_jax.attention.dispatch import s2_attention
  from longlora_jax.attention.pallas.grouped import (pallas_causal_attention,
                                                     pallas_s2_attention)

  group = group_size(method, seq, args)
  s2 = functools.partial(s2_attention, group_size=group, variant=args.variant)
  return {
      "dense": dense_causal_attention,
      "chunked": functools.partial(chunked_causal_attention,
                                   block_size=args.block),
      "s2_dense": functools.partial(s2, implementation="dense"),
      "s2_chunked": functools.partial(s2, implementation="chunked",
                                      block_size=args.block),
      "pallas": functools.partial(pallas_s2_attention, group_size=group,
                                  variant=args.variant,
                                  interpret=args.interpret),
      "pallas_causal": functools.partial(pallas_causal_attention,
                                         interpret=args.interpret),
      "s2_cudnn": functools.partial(cudnn_s2_attention, group_size=group,
                                    variant=args.variant),
      "full_cudnn": cudnn_causal_attention,
  }[method]


def measure(method: str, seq: int, args, dtype) -> dict:
  import jax
  import jax.numpy as jnp

  from longlora_jax.model.flops import attention_flops

  kv_heads = args.kv_heads or args.heads
  group = group_size(method, seq, args)
  variant = args.variant
  result = dict(method=method, seq=seq, group_size=group,
                variant=variant if group else None, time_s=None,
                fwd_time_s=None, peak_bytes=None)
  reason = skip_reason(method, jax.default_backend(), args)
  if reason:
    return dict(result, skipped=reason)
  attn = attention_for(method, seq, args)
  count = lambda backward: attention_flops(
      seq, args.heads, args.head_dim, batch=args.batch, group_size=group,
      variant=variant, backward=backward)
  result.update(flops=count(True), fwd_flops=count(False))

  def loss(q, k, v):
    return attn(q, k, v).astype(jnp.float32).sum()

  passes = {"": jax.value_and_grad(loss, (0, 1, 2))}
  if args.forward:
    passes["fwd_"] = attn
  q_shape = (args.batch, seq, args.heads, args.head_dim)
  kv_shape = (args.batch, seq, kv_heads, args.head_dim)
  shapes = [jax.ShapeDtypeStruct(s, dtype)
            for s in (q_shape, kv_shape, kv_shape)]
  # Dense full attention's O(seq^2) memory limits its timed lengths.
  timed_limit = args.dense_max_seq if method == "dense" else args.time_max_seq
  inputs = None
  if seq <= min(timed_limit, args.time_max_seq):
    keys = jax.random.split(jax.random.key(seq), 3)
    inputs = [jax.random.normal(key, s.shape, dtype)
              for key, s in zip(keys, shapes)]
  for prefix, fn in passes.items():
    try:
      t0 = time.perf_counter()
      compiled = jax.jit(fn).lower(*shapes).compile()
      result[prefix + "compile_s"] = round(time.perf_counter() - t0, 2)
      memory = compiled.memory_analysis()
      result[prefix + "temp_bytes"] = int(memory.temp_size_in_bytes)
      if inputs is not None:
        result[prefix + "time_s"] = timing.timed(
            lambda: compiled(*inputs), args.repeats).median_s
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: report it
      result[prefix + "error"] = f"{type(e).__name__}: {str(e)[:200]}"
  peak = timing.peak_bytes()
  if inputs is not None and peak is not None:
    result["peak_bytes"] = peak
  return result


def _measure_isolated(job):
  """Child process entry for --isolate: (method, seq, args, dtype name)."""
  method, seq, args, dtype_name = job
  import jax.numpy as jnp
  return measure(method, seq, args, jnp.dtype(dtype_name))


def memory_ratios(results: list[dict]) -> dict[str, list]:
  """Per method: temp bytes at each seq over temp bytes at the previous seq."""
  ratios = {}
  for method in dict.fromkeys(r["method"] for r in results):
    rows = [r for r in results
            if r["method"] == method and r.get("temp_bytes") is not None]
    ratios[method] = [
        dict(seq=b["seq"], seq_ratio=round(b["seq"] / a["seq"], 2),
             memory_ratio=round(b["temp_bytes"] / max(a["temp_bytes"], 1), 2))
        for a, b in zip(rows, rows[1:])]
  return ratios


def _row(r, tera):
  unit = 1e12 if tera else 1e9
  cells = [f"{r['method']:<13}", f"{r['seq']:>7}",
           f"{r['group_size'] or '-':>6}"]
  for prefix, flops in (("fwd_", r.get("fwd_flops")), ("", r.get("flops"))):
    t = r.get(prefix + "time_s")
    cells += [f"{1e3 * t:.2f}" if t else "-",
              f"{flops / t / unit:.2f}" if t else "-"]
  temp = r.get("temp_bytes")
  cells += [f"{temp / 2**20:.1f}" if temp is not None else "-",
            f"{r['peak_bytes'] / 2**20:.1f}" if r.get("peak_bytes") else "-",
            str(r.get("compile_s", "-"))]
  widths = (13, 7, 6, 9, 9, 11, 9, 10, 10, 9)
  line = " ".join(c.rjust(w) if i else c.ljust(w)
                  for i, (c, w) in enumerate(zip(cells, widths)))
  notes = [r[k] for k in ("skipped", "fwd_error", "error") if r.get(k)]
  return line + ("  " + "; ".join(notes) if notes else "")


def main(argv=None):
  args = parse_args(argv)
  if args.json:
    from longlora_jax.core.files import check_writable
    check_writable(args.json.parent)
  if args.isolate:
    import multiprocessing
    # Spawned children start JAX afresh; the parent never touches the GPU
    # (it would preallocate most of its memory).
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, maxtasksperchild=1) as pool:
      header = pool.apply(_header, (args,))
      _print_header(header)
      results = []
      for seq in args.seqs:
        for method in args.methods:
          r = pool.apply(_measure_isolated,
                         ((method, seq, args, header["dtype"]),))
          results.append(r)
          print(_row(r, header["backend"] == "gpu"), flush=True)
  else:
    import jax.numpy as jnp
    header = _header(args)
    _print_header(header)
    results = []
    for seq in args.seqs:
      for method in args.methods:
        r = measure(method, seq, args, jnp.dtype(header["dtype"]))
        results.append(r)
        print(_row(r, header["backend"] == "gpu"), flush=True)
  ratios = memory_ratios(sorted(results, key=lambda r: r["seq"]))
  print("\ntemp memory growth from the previous seq, seq:xmemory "
        "(seq doubling: linear 2, quadratic 4):")
  for method, rows in ratios.items():
    if not rows:
      continue
    print(f"  {method:<13} " + "  ".join(
        f"{r['seq']}:x{r['memory_ratio']}" for r in rows))
  if args.json:
    from longlora_jax.core.files import write_json
    write_json(args.json, dict(header, results=results, memory_ratios=ratios))
    print(f"wrote {args.json}")


def _header(args) -> dict:
  import jax

  backend = jax.default_backend()
  return dict(backend=backend, device_kind=jax.devices()[0].device_kind,
              jax_version=jax.__version__,
              dtype=args.dtype or ("bfloat16" if backend == "gpu"
                                   else "float32"),
              date=datetime.date.today().isoformat(), batch=args.batch,
              heads=args.heads, kv_heads=args.kv_heads or args.heads,
              head_dim=args.head_dim,
              group=args.group_size or f"{args.group_ratio} * seq",
              variant=args.variant, block=args.block,
              interpret=args.interpret)


def _print_header(header):
  print(" ".join(f"{k}={v}" for k, v in header.items()))
  rate = "TFLOP/s" if header["backend"] == "gpu" else "GFLOP/s"
  print(f"{'method':<13} {'seq':>7} {'group':>6} {'fwd ms':>9} "
        f"{rate:>9} {'fwd+bwd ms':>11} {rate:>9} {'temp MiB':>10} "
        f"{'peak MiB':>10} {'compile s':>9}")


if __name__ == "__main__":
  cli.run(main)
