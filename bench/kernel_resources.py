"""Registers and spills of the fused Pallas S²-Attn kernels per tile
configuration, without a GPU: forward + backward compiled by XLA:GPU for a
compile-only GPU (the Triton that jaxlib embeds, `perf.gpu_target`), then
each kernel's PTX through `ptxas -v`, as the driver would assemble it.

  python -m bench.kernel_resources                  # the default tiles
  python -m bench.kernel_resources --sweep          # and every sweep change

A configuration that spills registers is slow before it runs; one that
asks for more shared memory than the GPU has fails to compile (reported).
"""

import dataclasses
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from longlora_jax.core import cli
from longlora_jax.core.errors import LongLoraError


def parse_args(argv=None):
  p = cli.Parser(__doc__)
  p.add_argument("--target", default="h100", help="compile-only GPU "
                 "(longlora_jax.perf.gpu_target.GPUS)")
  p.add_argument("--seq", type=cli.count, default=32768)
  cli.option(p, "--heads")
  cli.option(p, "--head-dim", choices=(64, 128))
  p.add_argument("--sweep", action="store_true",
                 help="also each change of eval.gpu_check's tile sweeps")
  p.add_argument("--json", metavar="OUT", type=Path)
  return p.parse_args(argv)


def ptxas_resources(ptx: str, arch: str, ptxas: str = "ptxas") -> dict:
  """What `ptxas -v` reports for one kernel: registers per thread, spill
  stores and loads (bytes), static shared memory (bytes; Triton's is
  dynamic, so usually 0)."""
  with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
    f.write(ptx)
    f.flush()
    proc = subprocess.run([ptxas, f"-arch={arch}", "-v", f.name, "-o",
                           "/dev/null"], capture_output=True, text=True)
  if proc.returncode:
    raise LongLoraError(f"ptxas failed: {proc.stderr.strip()[:300]}")
  number = lambda pattern: int(m.group(1)) if (
      m := re.search(pattern, proc.stderr)) else 0
  return dict(registers=number(r"Used (\d+) registers"),
              spill_stores=number(r"(\d+) bytes spill stores"),
              spill_loads=number(r"(\d+) bytes spill loads"),
              static_shared=number(r"(\d+) bytes smem"))


def kernel_resources(config, *, target="h100", seq=32768, heads=32,
                     head_dim=128, ptxas="ptxas") -> dict:
  """{kernel: ptxas_resources} of the S² kernels' forward + backward at
  batch 1, bfloat16, G = seq / 4, with tiles `config`."""
  import jax
  import jax.numpy as jnp

  from longlora_jax.attention.pallas.grouped import pallas_s2_attention
  from longlora_jax.perf import gpu_target
  devices = gpu_target.devices(target, 1)
  on = jax.sharding.SingleDeviceSharding(devices[0])
  qkv = [jax.ShapeDtypeStruct((1, seq, heads, head_dim), jnp.bfloat16,
                              sharding=on)] * 3
  grads = jax.grad(lambda q, k, v: pallas_s2_attention(
      q, k, v, group_size=seq // 4, config=config).astype(
          jnp.float32).sum(), (0, 1, 2))
  with tempfile.TemporaryDirectory() as tmp:
    kernels = gpu_target.compile_to_ptx(grads, qkv, devices, tmp)[1]
  arch = gpu_target.GPUS[target].arch
  return {name.removeprefix("grouped_attention_"): ptxas_resources(
      ptx, arch, ptxas) for name, ptx in sorted(kernels.items())
          if name.startswith("grouped_attention_")}


def main(argv=None):
  args = parse_args(argv)
  ptxas = shutil.which("ptxas")
  if ptxas is None:
    raise LongLoraError("ptxas not found: put the CUDA toolkit's bin on PATH "
                        "(or pip install nvidia-cuda-nvcc-cu12)")
  if args.json:
    from longlora_jax.core.files import check_writable
    check_writable(args.json.parent)
  from bench.gpu_kernels import SWEEP, SWEEP_WIDE
  from longlora_jax.attention.pallas.grouped import default_config
  changes = [{}]
  for change in [*SWEEP, *(c for _, c in SWEEP_WIDE)] if args.sweep else []:
    changes += [change] * (change not in changes)
  base = default_config(args.head_dim)
  rows = []
  print("| changes from the default | kernel | registers | spill stores |")
  print("| --- | --- | ---: | ---: |")
  for change in changes:
    row = dict(changes=change)
    try:
      row["kernels"] = kernel_resources(
          dataclasses.replace(base, **change), target=args.target,
          seq=args.seq, heads=args.heads, head_dim=args.head_dim,
          ptxas=ptxas)
    except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(f"| {change or 'default'} | - | {row['error'][:80]} | |")
    for name, r in row.get("kernels", {}).items():
      print(f"| {change or 'default'} | {name} | {r['registers']} | "
            f"{r['spill_stores']} |", flush=True)
    rows.append(row)
  if args.json:
    from longlora_jax.core.files import write_json
    write_json(args.json, dict(target=args.target, seq=args.seq,
                               heads=args.heads, head_dim=args.head_dim,
                               configs=rows))
  return 0


if __name__ == "__main__":
  cli.run(main)
