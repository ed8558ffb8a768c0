"""Host memory of a run's phases on a mesh: loading a checkpoint into its
shards, adding LoRA, LoRA+ S²-Attn train steps, and exporting the merged
model and the adapter. Peak resident memory (Linux) of each phase.

  python -m bench.host_memory --ckpt DIR --mesh fsdp=8 --out runs/host_memory

On a CPU the devices' buffers are host memory too, so a phase's peak over
the memory held before it is what that phase adds: loading adds the model
(its shards) and little more; exporting adds about one output shard file
(`--max-shard-size`), not the model. On a GPU host only the transient is
in RSS.
"""

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

from bench.resident import Peak
from longlora_jax.core import cli

_GB = 1e9


def _shard_size(text: str) -> int | str:
  """An argparse `type`: bytes, or a size such as 5GB (as save_hf takes)."""
  from longlora_jax.core.errors import CheckpointError
  from longlora_jax.checkpoints.hf import parse_size
  size = int(text) if text.isdigit() else text
  try:
    parse_size(size)
  except CheckpointError:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a size in bytes or e.g. 5GB or 500MB") from None
  return size


def parse_args(argv=None):
  p = cli.Parser(__doc__)
  cli.option(p, "--ckpt", required=True)
  cli.option(p, "--mesh")
  cli.option(p, "--ctx", help="context the run extends to (RoPE factor); "
                              "default twice the model's")
  p.add_argument("--steps", type=cli.index, default=1,
                 help="LoRA+ S²-Attn train steps between loading and export "
                      "(0: export the freshly adapted model)")
  p.add_argument("--seq-len", type=cli.integer(8), default=64,
                 help="tokens per row of the train steps (one row per "
                      "data-parallel device)")
  cli.option(p, "--dtype")
  p.add_argument("--max-shard-size", type=_shard_size, default="1GB",
                 help="the exported model's shard files (transformers' 5GB "
                      "for real runs; smaller shows the bound on small "
                      "models)")
  p.add_argument("--out", type=Path, required=True,
                 help="directory for the export (hf/ and peft/ inside)")
  p.add_argument("--json", metavar="FILE", type=Path,
                 help="write the figures here too")
  return p.parse_args(argv)


def _phase(name: str, run, report: dict):
  """Runs `run()`, recording the anonymous resident memory before, its
  peak during (`bench.resident`, sampled every 5 ms) and after. Anonymous:
  the safetensors files are memory-mapped, and the pages a read touches
  count in RSS as file cache, which the kernel reclaims (VmHWM would count
  them)."""
  import gc

  import jax
  gc.collect()
  tick = time.time()
  with Peak() as memory:
    result = run()
    jax.block_until_ready(result)  # dispatch is asynchronous
  report[name] = {"before": memory.before, "peak": memory.peak,
                  "after": memory.after,
                  "added": memory.peak - memory.before,
                  "seconds": round(time.time() - tick, 1)}
  print(f"{name:<11} adds peak {report[name]['added'] / _GB:6.2f} GB   "
        f"anonymous RSS {memory.before / _GB:.2f} -> peak "
        f"{memory.peak / _GB:.2f} -> {memory.after / _GB:.2f} GB   "
        f"{report[name]['seconds']:.0f} s", flush=True)
  return result


def main(argv=None):
  args = parse_args(argv)
  from longlora_jax.core.errors import LongLoraError
  from longlora_jax.core.files import check_writable, write_json
  if not Path("/proc/self/status").exists():
    raise LongLoraError("this benchmark reads Linux's /proc/self; run it on "
                        "Linux")
  for out in (args.out, *([args.json.parent] if args.json else [])):
    check_writable(out)
  import jax
  import numpy as np
  from longlora_jax.checkpoints.checkpoint import Checkpoint, param_shardings
  from longlora_jax.checkpoints.hf import as_dtype, expected_shapes
  from longlora_jax.parallel.sharding import batch_parallelism, make_mesh
  from longlora_jax.training.export import write_outputs
  from longlora_jax.training.options import make_spec
  from longlora_jax.training.recipe import target_config
  from longlora_jax.training.step import (initial_run_state, jit_train_step,
                                          params_of)

  base = Checkpoint.open(args.ckpt)
  base.tokenizer  # the export copies it: fail here, not after loading
  mesh = make_mesh(args.mesh)
  ctx = args.ctx or 2 * base.config.context
  spec = make_spec({"ckpt": args.ckpt, "ctx": ctx, "dtype": args.dtype,
                    "accum": 1, "warmup": 0, "mesh": args.mesh},
                   task="extend", base_config=base.config.to_hf_dict())
  config = target_config(spec, base.config)
  jax.devices()  # backend start-up is not a phase
  report = {"model_bytes": as_dtype(args.dtype).itemsize * sum(
      int(np.prod(s)) for s in expected_shapes(base.config).values())}

  print(f"model {report['model_bytes'] / _GB:.2f} GB; phases:", flush=True)
  params = _phase("load", lambda: base.params(
      args.dtype, param_shardings(base.config, mesh)), report)

  state = _phase("lora_state", lambda: initial_run_state(spec, params, mesh),
                 report)
  loss = None
  if args.steps:
    ids = np.random.default_rng(0).integers(
        0, config.vocab_size, (1, batch_parallelism(mesh), args.seq_len))
    batch = {"input_ids": ids.astype(np.int32)}
    step, _, b_shard = jit_train_step(config, spec.recipe, mesh, state, batch)

    def train():
      nonlocal state
      for _ in range(args.steps):
        state, metrics = step(state, jax.device_put(batch, b_shard))
      return float(metrics["loss"])
    loss = _phase("train", train, report)

  params = params_of(state)
  for kind in ("hf", "peft"):  # the merged model, then the adapter
    _phase(f"export_{kind}", lambda: write_outputs(
        spec, base, config, params, {kind: args.out / kind},
        max_shard_size=args.max_shard_size), report)

  report.update(
      loss=loss, mesh=args.mesh, devices=jax.device_count(),
      platform=jax.devices()[0].platform, jax=jax.__version__,
      machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
      date=datetime.date.today().isoformat(), max_shard_size=args.max_shard_size)
  print(f"model {report['model_bytes'] / _GB:.2f} GB ({args.dtype}) on "
        f"{args.mesh}, {jax.device_count()} {report['platform']} devices"
        + (f"; loss {loss:.4f}" if loss is not None else ""))
  if args.json:
    write_json(args.json, report)


if __name__ == "__main__":
  cli.run(main)
