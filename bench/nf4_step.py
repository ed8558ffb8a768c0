"""The cost of 4-bit frozen weights per train step, at a real model's shapes.

Times the LoRA+ train step of `train.extend` (`training.step`: --remat,
full by default, and --s2-by-group; one micro-batch of one row, bfloat16,
the recipe's defaults otherwise) on one model's shapes twice, side by
side: the frozen weights in bfloat16, then with the layer kernels in NF4
(`nf4.quantize_layers`, QLoRA's double-quantized NormalFloat, dequantized
one layer at a time in the step). Weights and token ids are random
(nothing is downloaded); the model keeps its real widths but only
--layers of its layers, so a CPU can run it. Each step runs once untimed
(compilation) and then --repeats times (`bench.timing.timed`). Runs on
whatever backend JAX has (a CPU, or the same command on a GPU).

  python -m bench.nf4_step --model llama2-7b --layers 2 --ctx 1024
  python -m bench.nf4_step --model llama3.1-8b --layers 4 --ctx 8192 \\
      --json nf4_step.json

Prints a table (frozen weights, step seconds median and min, tokens/s,
the nf4/bf16 ratio of the medians) and the device, JAX version, model,
layers and context; --json writes the same as JSON. Progress goes to
stderr.
"""

import dataclasses
import functools
import os
import sys
import time

from bench import timing
from longlora_jax.core import cli
from longlora_jax.core.cpus import usable_cpus

FROZEN = ("bf16", "nf4")  # the rows, in this order


def parse_args(argv=None):
  p = cli.Parser(__doc__)
  cli.option(p, "--model")
  p.add_argument("--layers", type=cli.count, default=2,
                 help="layers kept of the model's (default 2)")
  cli.option(p, "--ctx", default=1024, help="tokens per step (default 1024; "
             "S²-Attn: a multiple of 8)")
  p.add_argument("--repeats", type=cli.count, default=3,
                 help="timed steps per row (default 3)")
  p.add_argument("--attention", choices=("s2", "full"), default="s2")
  cli.option(p, "--s2-by-group", default=False)
  cli.option(p, "--remat")
  p.add_argument("--seed", type=cli.index, default=0,
                 help="of the random weights and token ids")
  p.add_argument("--json", metavar="OUT", help="write the results here")
  return p.parse_args(argv)


def _say(text: str) -> None:
  print(f"[nf4_step] {text}", file=sys.stderr, flush=True)


def config_of(args):
  """The model's config with --layers layers, at --ctx (its RoPE scaled as
  `train.extend` scales it past the native context)."""
  from longlora_jax.checkpoints.checkpoint import model_config
  from longlora_jax.core.errors import LongLoraError
  config = model_config(args.model)
  if args.layers > config.num_hidden_layers:
    raise LongLoraError(
        f"--layers {args.layers}: {args.model} has "
        f"{config.num_hidden_layers} layers; use --layers "
        f"{config.num_hidden_layers} or fewer")
  return dataclasses.replace(config, num_hidden_layers=args.layers
                             ).with_context(args.ctx)


def recipe(args):
  """The train step's recipe: the defaults of `TrainConfig` but one
  micro-batch, bfloat16 and --remat (named, so a changed default does not
  change what this measures)."""
  from longlora_jax.attention.dispatch import AttentionSpec
  from longlora_jax.training.recipe import TrainConfig
  return TrainConfig(attention=AttentionSpec(args.attention,
                                            by_group=args.s2_by_group),
                     remat=args.remat, dtype="bfloat16", accum=1)


def measure(config, tc, params, batch, repeats: int, frozen: str) -> dict:
  """The row of `frozen` ("bf16" or "nf4"): the LoRA+ step over `params`,
  run as a training loop runs it, each step on the state the last one
  returned (the step donates its state; the values do not change the
  work)."""
  import jax
  from longlora_jax.parallel.sharding import make_mesh
  from longlora_jax.training.step import initial_state, jit_train_step
  state = initial_state(params, tc)
  del params
  mesh = make_mesh("fsdp=1", jax.devices()[:1])
  step, s_shard, b_shard = jit_train_step(config, tc, mesh, state, batch)
  # A copy: both rows' states hold the leaves `quantize_layers` leaves as
  # they are (LM head, norms), which the first row's donation would take.
  held = [jax.device_put(state, s_shard, may_alias=False)]
  del state
  batch = jax.device_put(batch, b_shard)
  frozen_bytes = sum(x.nbytes for x in jax.tree.leaves(held[0].frozen))

  def run():
    held[0], metrics = step(held[0], batch)
    return metrics

  _say(f"{frozen}: first step (compiling), then {repeats} timed")
  t = timing.timed(run, repeats)
  _say(f"{frozen}: first step {t.warmup_s:.1f} s; median {t.median_s:.2f} s")
  del held[0]
  return {"frozen": frozen, "step_s_median": t.median_s, "step_s_min": t.min_s,
          "step_s": list(t.times_s), "first_step_s": t.warmup_s,
          "tokens_per_s": batch["input_ids"].size / t.median_s,
          # The first step's: the same base model, LoRA B = 0 in both rows.
          "loss": float(t.first["loss"]),
          "frozen_weights_gib": frozen_bytes / 2**30}


def benchmark(args) -> dict:
  """The settings, both rows and the nf4/bf16 ratio of the medians."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from longlora_jax.model import nf4
  from longlora_jax.model.llama import init_params
  from longlora_jax.training.step import check_batch
  from longlora_jax.parallel.sharding import make_mesh
  config, tc = config_of(args), recipe(args)
  # Shape errors (an S²-Attn context not a multiple of 8) before anything
  # is allocated.
  check_batch(config, tc, (1, 1, args.ctx), make_mesh("fsdp=1",
                                                      jax.devices()[:1]))
  device, load = jax.devices()[0], os.getloadavg()
  _say(f"random {args.model} weights, {args.layers} layers, bfloat16")
  params = jax.jit(functools.partial(init_params, config,
                                     dtype=jnp.bfloat16))(
      jax.random.key(args.seed))
  ids = np.random.default_rng(args.seed).integers(
      0, config.vocab_size, (1, 1, args.ctx))
  batch = {"input_ids": jnp.asarray(ids, jnp.int32)}
  start = time.time()
  quantized = nf4.quantize_layers(params)
  _say(f"layer kernels quantized to NF4 in {time.time() - start:.1f} s")
  rows = [measure(config, tc, p, batch, args.repeats, frozen)
          for frozen, p in zip(FROZEN, (params, quantized))]
  return {
      "model": args.model, "layers": args.layers, "ctx": args.ctx,
      "attention": args.attention, "repeats": args.repeats,
      "recipe": f"LoRA+ (r=8, alpha 16), remat {args.remat}, accum 1, "
                "batch 1, bfloat16"
                + (", S²-Attn by group" if args.s2_by_group else ""),
      "device": f"{device.platform}: {device.device_kind}",
      "devices": jax.device_count(), "jax": jax.__version__,
      # A CPU's step shares its cores: above their count, other jobs ran.
      "cpus": usable_cpus(),
      "load_avg": [load, os.getloadavg()],  # 1, 5, 15 min: before, after
      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      "rows": rows,
      "ratio_nf4_bf16": rows[1]["step_s_median"] / rows[0]["step_s_median"],
  }


def table(result: dict) -> str:
  """The Markdown table of `result` (what --json writes) and its settings."""
  lines = ["| frozen weights | GiB | step s (median) | step s (min) | "
           "tokens/s | nf4/bf16 |", "|---|---:|---:|---:|---:|---:|"]
  for row in result["rows"]:
    ratio = (f"{result['ratio_nf4_bf16']:.2f}" if row["frozen"] == "nf4"
             else "1")
    lines.append(f"| {row['frozen']} | {row['frozen_weights_gib']:.2f} | "
                 f"{row['step_s_median']:.3f} | {row['step_s_min']:.3f} | "
                 f"{row['tokens_per_s']:,.0f} | {ratio} |")
  r = result
  lines.append(
      f"\n{r['model']} shapes, {r['layers']} layers, ctx {r['ctx']}, "
      f"{r['attention']} attention; {r['recipe']}; {r['repeats']} timed "
      f"steps each after one untimed (compilation); device {r['device']} "
      f"(of {r['devices']}); JAX {r['jax']}; {r['cpus']} CPUs, load "
      f"average {r['load_avg'][0][0]:.1f} before, {r['load_avg'][1][0]:.1f} "
      f"after; {r['date']}")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  result = benchmark(args)
  print(table(result))
  if args.json:
    from longlora_jax.core.files import write_json
    write_json(args.json, result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  cli.run(main)
