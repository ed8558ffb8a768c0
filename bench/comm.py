"""Bytes one attention layer moves per device under context parallelism.

Compiles one layer's attention, forward and backward (the gradient of
sum(out * w) with respect to q, k, v), with the sequence split over a
`context` mesh axis, against abstract arrays (nothing is allocated), and
sums the bytes of the collectives in the compiled HLO
(`hlo.collective_bytes`). S²-Attn (`attention.context`: ppermute of the
shifted half and a halo of earlier keys) against full attention (all-gather
of keys and values). `--target h100` compiles with XLA:GPU for compile-only
devices (JAX's CUDA plugin, no GPU needed); `--target cpu` with XLA:CPU on
fake devices, which moves bfloat16 as float32 (twice the bytes).

  python -m bench.comm --target h100 --ctx 131072 1048576
  python -m bench.comm --ctx 1048576 --group 32768 262144 --context 4 8

Inside the train step a layer's attention runs once more (the remat
recomputation of the forward pass), whose collectives repeat.
"""

import os

from longlora_jax.core import cli
from longlora_jax.perf import gpu_target


def parse_args(argv=None):
  p = cli.Parser(__doc__)
  cli.option(p, "--ctx", nargs="+", default=[131072, 1048576],
             help="sequence lengths")
  p.add_argument("--context", type=cli.count, nargs="+", default=[8],
                 help="devices on the context axis")
  p.add_argument("--group", type=cli.count, nargs="+", default=None,
                 help="S² group sizes G (default: ctx / 4)")
  cli.option(p, "--heads")
  cli.option(p, "--kv-heads")
  cli.option(p, "--head-dim")
  p.add_argument("--methods", nargs="+", choices=("s2", "full"),
                 default=["s2", "full"])
  p.add_argument("--variant", choices=("flash", "roll"), default="flash",
                 help="S²-Attn's shifted groups (attention.groups)")
  p.add_argument("--target", choices=("cpu", *sorted(gpu_target.GPUS)),
                 default="h100",
                 help="compiler: XLA:GPU for compile-only devices of this "
                      "GPU (default), or XLA:CPU on fake devices")
  p.add_argument("--json", help="also write the rows to this JSON file")
  return p.parse_args(argv)


def layer_bytes(method: str, ctx: int, context: int, group: int, heads: int,
                kv_heads: int, head_dim: int, devices,
                variant: str = "flash") -> dict[str, int]:
  """Collective bytes per device of one attention layer's forward and
  backward at `ctx` tokens split over `context` of `devices`."""
  import functools

  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding

  from longlora_jax.attention.dispatch import (context_form, full_attention,
                                               s2_attention)
  from longlora_jax.perf.hlo import collective_bytes
  from longlora_jax.parallel.sharding import (activation_mesh, activation_spec,
                                     make_mesh, per_row_shard)
  mesh = make_mesh(f"context={context}", devices[:context])
  fn = (functools.partial(s2_attention, group_size=group, variant=variant)
        if method == "s2" else full_attention)

  def loss(q, k, v, w):
    with activation_mesh(mesh):
      out = per_row_shard(fn, context_form(fn))(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * w)

  sharding = NamedSharding(mesh, activation_spec(4))
  shape = lambda n, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(
      (1, ctx, n, head_dim), dtype, sharding=sharding)
  compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(
      shape(heads), shape(kv_heads), shape(kv_heads),
      shape(heads, jnp.float32)).compile()
  return collective_bytes(compiled.as_text())


def main(argv=None):
  args = parse_args(argv)
  if args.target == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count="
                               f"{max(args.context)}")
  import datetime

  import jax
  from tqdm import tqdm

  devices = (jax.devices() if args.target == "cpu" else
             gpu_target.devices(args.target, max(args.context)))
  kv_heads = args.kv_heads or args.heads
  runs = []
  for ctx in args.ctx:
    for context in args.context:
      if "s2" in args.methods:
        runs += [("s2", ctx, context, g) for g in args.group or [ctx // 4]]
      if "full" in args.methods:  # no groups: once per length and split
        runs.append(("full", ctx, context, None))
  rows = []
  for method, ctx, context, group in tqdm(runs, desc="compiling"):
    moved = layer_bytes(method, ctx, context, group, args.heads, kv_heads,
                        args.head_dim, devices, args.variant)
    rows.append(dict(method=method if method == "full" else
                     f"s2 {args.variant}", ctx=ctx, context=context,
                     group=group if method == "s2" else None,
                     mib=sum(moved.values()) / 2**20,
                     by_kind={k: v / 2**20 for k, v in moved.items() if v}))
  compiler = ("XLA:CPU (fake devices; bf16 moves as f32)"
              if args.target == "cpu" else
              f"XLA:GPU compile-only {gpu_target.GPUS[args.target].name}")
  header = dict(compiler=compiler, jax=jax.__version__,
                date=datetime.date.today().isoformat(), heads=args.heads,
                kv_heads=kv_heads, head_dim=args.head_dim, dtype="bfloat16")
  print(f"{compiler}, jax {jax.__version__}, {header['date']}; one layer's "
        f"attention forward + backward, {args.heads} q / {kv_heads} kv heads "
        f"of {args.head_dim}, bf16")
  print("| method | tokens | context | G | MiB per device | by kind (MiB) |")
  print("|---|---:|---:|---:|---:|---|")
  for r in rows:
    kinds = ", ".join(f"{k} {v:.1f}" for k, v in r["by_kind"].items())
    print(f"| {r['method']} | {r['ctx']:,} | {r['context']} | "
          f"{r['group'] or '-'} | {r['mib']:.1f} | {kinds} |")
  if args.json:
    from longlora_jax.core.files import write_json
    write_json(args.json, dict(header, rows=rows))


if __name__ == "__main__":
  cli.run(main)
