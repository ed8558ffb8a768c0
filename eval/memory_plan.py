"""Per-device memory and FLOPs of the real train step, without a GPU.

Compiles the sharded train step against abstract arrays (nothing is
allocated) and prints XLA's memory analysis next to an analytic breakdown,
and XLA's FLOP count next to the analytic one. `--target h100|a100|l40s|
rtx4090` compiles with XLA:GPU for compile-only devices of that GPU and its
architecture (sm_90a, sm_80, sm_89; JAX's CUDA plugin, no GPU needed);
`--target cpu` with XLA:CPU on fake CPU devices, which keeps some bfloat16
buffers in float32 and so over-states GPU memory.

  python -m eval.memory_plan --model llama2-7b --ctx 100000 --mesh fsdp=8 \
      --target h100
  python -m eval.memory_plan --eval --model llama3.1-8b --ctx 400000 \
      --mesh tensor=2 --target h100

`--eval` plans an evaluation instead (passkey, RULER, generation: the last
prefill step and a decode step of the KV-cache generator at --ctx tokens,
--batch prompts).

`--find-max-ctx` searches for the largest context (a multiple of
--ctx-step) whose train step fits the usable memory of one --target GPU,
and whose pinned host memory (offloaded activations) fits --host-gib,
printing each compiled probe, then that context's plan, the pinned host
memory it needs and the limit that binds (device or host):

  python -m eval.memory_plan --find-max-ctx --model llama3.1-8b \
      --mesh fsdp=1 --target h100 --offload activations

Usable memory: JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION of a GPU's
memory (0.75 when unset) and a program gets no more, so the search plans
against that fraction of the target's nominal memory (read from the
environment when set), or against --usable-gib. The CUDA context and
allocator fragmentation come on top. Pinned host memory: XLA's memory
analysis of the step (its host temporaries) where it reports them, else a
hand count (layers x layer-input bytes); the plan says which.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import tempfile
import time
from pathlib import Path

from longlora_jax.core import cli
from longlora_jax.perf import gpu_target, hlo, memory_search
from longlora_jax.core.errors import LongLoraError


def parse_args(argv=None):
  p = cli.Parser(__doc__)
  cli.option(p, "--model")
  cli.option(p, "--ctx", default=100000, help="sequence length")
  cli.option(p, "--mesh", default="fsdp=8",
             purpose="the mesh planned for (8 devices when an axis is -1)")
  p.add_argument("--batch", type=cli.count, default=1,
                 help="sequences per device")
  p.add_argument("--accum", type=cli.count, default=1,
                 help="micro-batches per step")
  p.add_argument("--attention", choices=("s2", "full"), default="s2")
  cli.option(p, "--s2-by-group", default=False)
  cli.option(p, "--remat")
  cli.option(p, "--offload")
  cli.option(p, "--quantize")
  p.add_argument("--target", choices=("cpu", *sorted(gpu_target.GPUS)),
                 default="cpu",
                 help="compiler: XLA:CPU on fake devices (default), or "
                      "XLA:GPU for compile-only devices of this GPU")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--lora", dest="mode", action="store_const", const="lora+",
                    help="LoRA+ (default): adapters, embeddings and norms")
  mode.add_argument("--full-ft", dest="mode", action="store_const", const="full")
  p.set_defaults(mode="lora+")
  p.add_argument("--eval", action="store_true",
                 help="plan generation's last prefill step and a decode "
                      "step (eval.passkey, eval.ruler, eval.chat) instead "
                      "of the train step")
  p.add_argument("--chunk", type=cli.count, default=2048,
                 help="--eval: prefill tokens per step")
  p.add_argument("--find-max-ctx", action="store_true",
                 help="search for the largest context whose train step fits "
                      "the usable memory (see above)")
  p.add_argument("--ctx-step", type=cli.count, default=8192,
                 help="--find-max-ctx: contexts probed are multiples of this")
  p.add_argument("--usable-gib", type=cli.positive,
                 help="--find-max-ctx: memory per device to fit (default: "
                      "XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 when unset, of "
                      "the --target GPU's memory)")
  p.add_argument("--host-gib", type=cli.positive,
                 help="--find-max-ctx: pinned host memory per GPU for "
                      "offloaded activations (default: h100, a100 256, a "
                      "DGX's 2 TB over 8 GPUs; l40s 128, a 4-GPU server's "
                      "512 GB; rtx4090 64, half a 128 GB workstation, as "
                      "pinned memory is never paged out)")
  p.add_argument("--json", action="store_true", help="print JSON only")
  return p.parse_args(argv)


def _devices_in(mesh_spec: str) -> int:
  sizes = [int(part.split("=")[1]) for part in mesh_spec.split(",") if part]
  if any(s < 1 for s in sizes):
    return 8  # "-1" axes: plan on 8 devices.
  n = 1
  for s in sizes:
    n *= s
  return n


def _mesh(args):
  import jax

  from longlora_jax.parallel.sharding import make_mesh
  n = _devices_in(args.mesh)
  return make_mesh(args.mesh, jax.devices()[:n] if args.target == "cpu" else
                   gpu_target.devices(args.target, n))


def plan_eval(args) -> dict:
  """XLA's per-device memory of the evaluation's last prefill step and of
  a decode step at --ctx."""
  import jax

  from longlora_jax.checkpoints.checkpoint import model_config
  from longlora_jax.model.generation import lower_extend
  from longlora_jax.model.kv_cache import cache_sharding
  config = model_config(args.model).with_context(args.ctx)
  mesh = _mesh(args)
  t0 = time.time()
  step = lambda decode: lower_extend(config, mesh, ctx=args.ctx,
                                     chunk=args.chunk, batch=args.batch,
                                     decode=decode).compile()
  compiled, decode = step(False), step(True)
  one = (config.num_hidden_layers, args.batch, config.num_key_value_heads,
         config.head_dim, args.ctx)  # the keys' shape; the values' alike
  parts = cache_sharding(config, args.batch, mesh).shard_shape(one)
  cache = 2 * math.prod(one) * 2  # keys and values, bfloat16
  return {
      "model": args.model, "ctx": args.ctx, "mesh": dict(mesh.shape),
      "devices": mesh.size, "evaluation": "prefill (eval.passkey, eval.ruler)",
      "batch": args.batch, "chunk": args.chunk, "target": args.target,
      "jax": jax.__version__, "compile_seconds": round(time.time() - t0, 1),
      "per_device_gib": memory_search.program_gib(compiled),
      "decode_per_device_gib": memory_search.program_gib(decode),
      "kv_cache_gib_total": cache / 2**30,
      "loading_gib": _loading(config, mesh),
      "kv_cache_split": math.prod(one) // math.prod(parts),
  }


def _loading(config, mesh, quantize: str = "none") -> dict:
  """`hf.loading_memory` in GiB, one process per 8-device host."""
  from longlora_jax.checkpoints.checkpoint import param_shardings
  from longlora_jax.checkpoints.hf import loading_memory
  peaks = loading_memory(config, param_shardings(config, mesh), "bfloat16",
                         process_devices=min(mesh.size, 8), quantize=quantize)
  return {k: v / 2**30 for k, v in peaks.items()}


def _print_loading(result) -> None:
  load = result["loading_gib"]
  how = ("layer kernels quantized to NF4 as read, the rest bf16"
         if result.get("quantize", "none") != "none" else "bf16")
  print(f"loading ({how}, straight into the shards): per device "
        f"{load['device_final']:.2f} GiB of weights + at most "
        f"{load['device_transient']:.2f} GiB in flight; per host "
        f"{load['host_transient']:.2f} GiB beyond the device buffers "
        f"({min(result['devices'], 8)} devices per host)")


def _fits(result) -> str:
  if result["target"] == "cpu":
    return ("note: XLA:CPU keeps bfloat16 buffers (the residual stack among "
            "them) in float32, so this over-states GPU memory; a GPU --target "
            "(h100, a100, l40s, rtx4090) compiles with XLA:GPU")
  gpu = gpu_target.GPUS[result["target"]]
  total = result["per_device_gib"]["total"]
  return (f"{total:.2f} of {gpu.memory_bytes / 2**30:.0f} GiB per {gpu.name} "
          "(before the CUDA context, library workspaces and allocator "
          "fragmentation)")


def plan(args) -> dict:
  import jax

  from longlora_jax.attention.dispatch import AttentionSpec, fused_for
  from longlora_jax.checkpoints.checkpoint import model_config
  from longlora_jax.model.flops import paper_flops, step_flops
  from longlora_jax.model.remat import kept_layer_inputs
  from longlora_jax.parallel.sharding import batch_parallelism
  from longlora_jax.training.recipe import TrainConfig
  from longlora_jax.training.step import OffloadedStep, lower_step

  config = model_config(args.model).with_context(args.ctx)
  mesh = _mesh(args)
  # What a run on the target picks: the fused kernel on a GPU where it
  # applies (for full attention too), else S²-Attn's default and, for full
  # attention, the memory-efficient chunks (dense needs seq^2 memory).
  # Under a context axis attention takes the chunked path
  # (`attention.context`).
  fused = (fused_for(config.head_dim, "bfloat16", platform="gpu")
           if args.target != "cpu" and mesh.shape["context"] == 1 else None)
  attention = AttentionSpec(
      args.attention,
      implementation=fused or ("auto" if args.attention == "s2"
                               else "chunked"),
      by_group=args.s2_by_group)
  tc = TrainConfig(attention=attention, remat=args.remat, accum=args.accum,
                   offload=args.offload)
  group = args.ctx // 4 if args.attention == "s2" else None

  t0 = time.time()
  with (gpu_target.assume_cudnn() if args.target != "cpu"
        else contextlib.nullcontext()):
    lowered, state = lower_step(config, tc, mesh, ctx=args.ctx,
                                mode=args.mode, batch_per_device=args.batch,
                                quantize=args.quantize)
  with tempfile.TemporaryDirectory() as dump:
    compiled = lowered.compile({"xla_dump_to": dump})
    compile_s = time.time() - t0
    # XLA names the file after the module and the pass; newer versions may
    # not write it, and the plan stands without it. With the optimizer
    # offloaded, the gradients' program is where the activations peak.
    found = sorted(p for p in Path(dump).glob("*buffer-assignment.txt")
                   if "update_fn" not in p.name)
    largest = hlo.largest_temporaries(found[0].read_text(), k=6) if found else []
  update_program = None
  if isinstance(compiled, OffloadedStep):
    compiled, update_program = compiled.grads_fn, memory_search.program_gib(compiled.update_fn)
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}

  n_dev = mesh.size
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  gib = 2.0 ** 30
  tokens_per_device = args.batch * args.accum * args.ctx
  saved_per_layer = (args.batch * args.ctx // mesh.shape["context"]
                     * config.hidden_size * 2)  # bf16, this device's tokens
  rows = args.batch * batch_parallelism(mesh)
  analytic = step_flops(config, args.ctx, batch=rows * args.accum,
                        group_size=group)
  memory = memory_search.program_gib(compiled)
  if update_program is not None:
    memory = memory_search.with_update(memory, update_program,
                                       nbytes(state.frozen) / n_dev / gib)
  result = {
      "model": args.model, "ctx": args.ctx, "mesh": dict(mesh.shape),
      "devices": n_dev,
      "attention": args.attention + (" by group" if args.s2_by_group else ""),
      "fused_kernel": fused,
      "mode": args.mode, "quantize": args.quantize, "remat": args.remat,
      "offload": args.offload, "batch_per_device": args.batch,
      "accum": args.accum, "target": args.target,
      "compiler": ("XLA:CPU" if args.target == "cpu" else
                   "XLA:GPU compile-only, "
                   f"{gpu_target.GPUS[args.target].name}, "
                   f"{gpu_target.GPUS[args.target].arch}"),
      "jax": jax.__version__, "compile_seconds": round(compile_s, 1),
      "per_device_gib": memory, **memory_search.host_need(
          memory, args.offload, config.num_hidden_layers * saved_per_layer
          / gib, nbytes((state.trainable, state.opt_state)) / n_dev / gib),
      "breakdown_estimate_gib": {
          "frozen_weights": nbytes(state.frozen) / n_dev / gib,
          "trainable_fp32": nbytes(state.trainable) / n_dev / gib,
          "optimizer_state": nbytes(state.opt_state) / n_dev / gib,
          "layer_inputs_kept_for_backward": kept_layer_inputs(
              config.num_hidden_layers, args.remat) * saved_per_layer / gib,
      },
      "largest_temporaries": largest,
      "loading_gib": _loading(config, mesh, args.quantize),
      "trainable_params": sum(x.size for x in jax.tree.leaves(state.trainable)),
      "tokens_per_device_per_step": tokens_per_device,
      "tflops_per_step": {
          # XLA counts each while-loop body (layers, attention blocks, loss
          # chunks) once, so this is far below the real work.
          "xla_cost_analysis_per_device": cost.get("flops", float("nan")) / 1e12,
          "analytic_total": analytic / 1e12,
          "analytic_per_device": analytic / n_dev / 1e12,
          "paper_convention_per_sequence":
              paper_flops(config, args.ctx, group_size=group) / 1e12,
      },
  }
  return result


def _print_plan(result) -> None:
  m, b, f = (result["per_device_gib"], result["breakdown_estimate_gib"],
             result["tflops_per_step"])
  print(f"{result['model']}  ctx {result['ctx']:,}  mesh {result['mesh']}  "
        f"{result['attention']}"
        f"{f' ({fused})' if (fused := result['fused_kernel']) else ''}  "
        f"{result['mode']}  quantize={result['quantize']}  "
        f"remat={result['remat']}  "
        f"offload={result['offload']}  "
        f"({result['compiler']}, compiled in {result['compile_seconds']} s, "
        f"jax {result['jax']})")
  print("per device (XLA memory analysis, GiB):")
  for k, v in m.items():
    print(f"  {k:<16} {v:8.2f}")
  print("breakdown estimate (GiB):")
  for k, v in b.items():
    print(f"  {k:<32} {v:8.2f}")
  _print_largest(result)
  print(f"trainable params {result['trainable_params']:,}")
  print(f"TFLOPs per step: analytic {f['analytic_per_device']:.1f} per device, "
        f"{f['analytic_total']:.1f} total (fwd+bwd, causal pairs); XLA cost "
        f"analysis {f['xla_cost_analysis_per_device']:.1f} per device (counts "
        f"each loop body once); paper convention (forward, unmasked) "
        f"{f['paper_convention_per_sequence']:.0f} per sequence")
  _print_loading(result)
  print(_fits(result))


def _print_largest(result) -> None:
  print("largest temporaries in device memory (XLA buffer assignment, GiB):")
  for t in result["largest_temporaries"]:
    print(f"  {t['gib']:8.2f}  {t['shape']:<28} {t['name']}")


def _print_eval_plan(result) -> None:
  print(f"{result['model']}  ctx {result['ctx']:,}  mesh {result['mesh']}  "
        f"{result['evaluation']}, {result['batch']} prompt(s), chunks of "
        f"{result['chunk']}  (compiled in {result['compile_seconds']} s, "
        f"jax {result['jax']})")
  print("per device (XLA memory analysis, GiB):")
  print(f"  {'':<16} {'prefill':>8} {'decode':>8}")
  for k, v in result["per_device_gib"].items():
    print(f"  {k:<16} {v:8.2f} "
          f"{result['decode_per_device_gib'][k]:8.2f}")
  print(f"KV cache {result['kv_cache_gib_total']:.2f} GiB in all, split "
        f"{result['kv_cache_split']} ways (kv heads over the tensor axis)")
  _print_loading(result)
  print(_fits(result))


def main(argv=None):
  args = parse_args(argv)
  if args.find_max_ctx and args.eval:
    raise LongLoraError("--find-max-ctx searches train steps; drop --eval")
  if args.s2_by_group and (args.eval or args.attention == "full"):
    raise LongLoraError("--s2-by-group runs S²-Attn's groups in training; "
                        "drop it with --attention full or --eval")
  if args.quantize != "none" and (args.eval or args.mode == "full"):
    raise LongLoraError("--quantize plans LoRA+ train steps over 4-bit "
                        "weights; drop it with --eval or --full-ft")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={_devices_in(args.mesh)}")
  if args.find_max_ctx:
    found = memory_search.find_max_ctx(
        lambda ctx: plan(argparse.Namespace(**{**vars(args), "ctx": ctx})),
        args.ctx_step, memory_search.usable_gib(args.target, args.usable_gib),
        memory_search.host_gib(args.target, args.host_gib),
        s2=args.attention == "s2", offload_more=(
            None if args.offload == "activations,optimizer"
            else "activations,optimizer"),
        report=None if args.json else functools.partial(print, flush=True))
    if args.json:
      print(json.dumps(found, indent=2))
    else:
      memory_search.print_found(found, _print_plan, _print_largest)
    return
  result = (plan_eval if args.eval else plan)(args)
  if args.json:
    print(json.dumps(result, indent=2))
  elif args.eval:
    _print_eval_plan(result)
  else:
    _print_plan(result)


if __name__ == "__main__":
  cli.run(main)
