"""Attention benchmark: forward + backward time and XLA temporary memory.

Compares full (dense) attention, chunked (flash-style, pure JAX) attention
and S²-Attn with dense ("xla") and chunked groups, at growing sequence
lengths on the current backend. Memory is XLA's compiled temporary buffer
size (`memory_analysis().temp_size_in_bytes`), which needs no allocation, so
it is reported beyond the lengths that are timed.

  python -m eval.bench_attention --seqs 1024 2048 4096 --json out.json
"""

import argparse
import datetime
import json
import time


METHODS = ("full", "chunked", "s2_xla", "s2_chunked")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seqs", type=int, nargs="+",
                 default=[1024, 2048, 4096, 8192, 16384])
  p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=4, help="query heads")
  p.add_argument("--kv-heads", type=int, default=None, help="default: heads")
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="default: bfloat16 on GPU, float32 on CPU")
  p.add_argument("--group-ratio", type=float, default=0.25,
                 help="S²-Attn group size / seq (LongLoRA: 1/4)")
  p.add_argument("--group-size", type=int, default=None,
                 help="a fixed S²-Attn group size instead of the ratio")
  p.add_argument("--block", type=int, default=512, help="chunked block size")
  p.add_argument("--time-max-seq", type=int, default=8192,
                 help="longer sequences: memory only (compiled, not run)")
  p.add_argument("--full-max-seq", type=int, default=4096,
                 help="longer sequences: full attention memory only")
  p.add_argument("--repeats", type=int, default=3,
                 help="timed runs after a warm-up; the median is reported")
  p.add_argument("--json", metavar="OUT", help="write the results here")
  return p.parse_args(argv)


def group_size(method: str, seq: int, args) -> int | None:
  if not method.startswith("s2"):
    return None
  return args.group_size or int(seq * args.group_ratio)


def attention_for(method: str, seq: int, args):
  import functools

  from longlora_jax.attention import causal_attention
  from longlora_jax.chunked_attention import chunked_causal_attention
  from longlora_jax.s2_attention import s2_attention

  group = group_size(method, seq, args)
  return {
      "full": causal_attention,
      "chunked": functools.partial(chunked_causal_attention,
                                   block_size=args.block),
      "s2_xla": functools.partial(s2_attention, group_size=group),
      "s2_chunked": functools.partial(s2_attention, group_size=group,
                                      implementation="chunked",
                                      block_size=args.block),
  }[method]


def measure(method: str, seq: int, args, dtype) -> dict:
  import jax
  import jax.numpy as jnp

  from longlora_jax.attention import attention_flops

  attn = attention_for(method, seq, args)
  kv_heads = args.kv_heads or args.heads

  def loss(q, k, v):
    return attn(q, k, v).astype(jnp.float32).sum()

  step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
  q_shape = (args.batch, seq, args.heads, args.head_dim)
  kv_shape = (args.batch, seq, kv_heads, args.head_dim)
  shapes = [jax.ShapeDtypeStruct(s, dtype) for s in (q_shape, kv_shape, kv_shape)]
  t0 = time.perf_counter()
  compiled = step.lower(*shapes).compile()
  compile_s = time.perf_counter() - t0
  group = group_size(method, seq, args)
  flops = attention_flops(seq, args.heads, args.head_dim, batch=args.batch,
                          group_size=group, backward=True)
  result = dict(method=method, seq=seq, group_size=group,
                temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes),
                compile_s=round(compile_s, 2), flops=flops, time_s=None)
  timed_limit = args.full_max_seq if method == "full" else args.time_max_seq
  if seq <= min(timed_limit, args.time_max_seq):
    keys = jax.random.split(jax.random.key(seq), 3)
    q, k, v = (jax.random.normal(key, s, dtype)
               for key, s in zip(keys, (q_shape, kv_shape, kv_shape)))
    jax.block_until_ready(compiled(q, k, v))  # warm-up
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(q, k, v))
      times.append(time.perf_counter() - t0)
    result["time_s"] = sorted(times)[len(times) // 2]
  return result


def memory_ratios(results: list[dict]) -> dict[str, list]:
  """Per method: temp bytes at each seq over temp bytes at the previous seq."""
  ratios = {}
  for method in dict.fromkeys(r["method"] for r in results):
    rows = [r for r in results if r["method"] == method]
    ratios[method] = [
        dict(seq=b["seq"], seq_ratio=round(b["seq"] / a["seq"], 2),
             memory_ratio=round(b["temp_bytes"] / max(a["temp_bytes"], 1), 2))
        for a, b in zip(rows, rows[1:])]
  return ratios


def main(argv=None):
  args = parse_args(argv)
  import jax
  import jax.numpy as jnp

  backend = jax.default_backend()
  dtype_name = args.dtype or ("bfloat16" if backend == "gpu" else "float32")
  dtype = jnp.dtype(dtype_name)
  device = jax.devices()[0]
  header = dict(backend=backend, device_kind=device.device_kind,
                jax_version=jax.__version__, dtype=dtype_name,
                date=datetime.date.today().isoformat(), batch=args.batch,
                heads=args.heads, kv_heads=args.kv_heads or args.heads,
                head_dim=args.head_dim,
                group=args.group_size or f"{args.group_ratio} * seq",
                block=args.block)
  print(" ".join(f"{k}={v}" for k, v in header.items()))
  print(f"{'method':<11} {'seq':>7} {'group':>6} {'fwd+bwd ms':>11} "
        f"{'GFLOP/s':>8} {'temp MiB':>10} {'compile s':>9}")
  results = []
  for seq in args.seqs:
    for method in args.methods:
      r = measure(method, seq, args, dtype)
      results.append(r)
      ms = f"{1e3 * r['time_s']:.1f}" if r["time_s"] else "-"
      rate = f"{r['flops'] / r['time_s'] / 1e9:.1f}" if r["time_s"] else "-"
      print(f"{method:<11} {seq:>7} {r['group_size'] or '-':>6} {ms:>11} "
            f"{rate:>8} {r['temp_bytes'] / 2**20:>10.1f} {r['compile_s']:>9}",
            flush=True)
  ratios = memory_ratios(sorted(results, key=lambda r: r["seq"]))
  print("\ntemp memory growth from the previous seq, seq:xmemory "
        "(seq doubling: linear 2, quadratic 4):")
  for method, rows in ratios.items():
    print(f"  {method:<11} " + "  ".join(
        f"{r['seq']}:x{r['memory_ratio']}" for r in rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(header, results=results, memory_ratios=ratios), f,
                indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
