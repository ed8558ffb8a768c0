"""Side by side with the PyTorch recipe: train steps, attention, generation.

One float32 transformers LlamaForCausalLM (random weights, batch 1) is saved
once; each measurement then loads it in a fresh process, either ours
(`Checkpoint`, the train step of `train.extend` with LoRA+ and remat,
`generate`) or theirs: transformers + PEFT as the official LongLoRA
fine-tune.py trains it (LoRA+ r=8, alpha=16 on q,k,v,o, embed and norms
trained, lm_head frozen, AdamW, gradient checkpointing per layer) with the
official S²-Attn `forward_noflashattn` for "s2_step"
(tests/references/longlora_torch.py) and sdpa for "full_step", and
`model.generate` (greedy); "attention" is one layer's causal attention
alone, forward + backward: our "full" (chunked on a CPU) against torch's
sdpa. The two sides alternate, --pairs times per workload and length. A
process runs its workload once untimed (the warm-up: compilation on our
side) and then --repeats times; its time is the median. Ratios are ours / theirs per pair: their median and min-max.
Greedy tokens must be equal on both sides. PyTorch runs on the CPU, so
ours does too. "load" is the 1-minute load average as each process starts:
above the core count other jobs share the cores, and PyTorch's OpenMP
threads then slow down far more than XLA's; --cpus 1 gives each side one
core (the same one) and one thread.

  python -m bench.vs_torch --json vs_torch.json
  python -m bench.vs_torch --cpus 1     # a machine other jobs share
"""

import datetime
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from bench import timing
from longlora_jax.core import cli
from longlora_jax.core.errors import LongLoraError

WORKLOADS = ("s2_step", "full_step", "attention", "prefill", "decode")
TITLES = {"s2_step": "S² train step", "full_step": "full train step",
          "attention": "attention", "prefill": "prefill", "decode": "decode"}


def parse_args(argv=None):
  p = cli.Parser(__doc__)
  p.add_argument("--workloads", nargs="+", choices=WORKLOADS,
                 default=list(WORKLOADS), metavar="WORKLOAD",
                 help="of " + ", ".join(WORKLOADS))
  p.add_argument("--train-lengths", nargs="+", default=[2048, 4096],
                 type=cli.integer(8, tokens=True),
                 help="tokens per training step (S²: a multiple of 8)")
  p.add_argument("--prefill-lengths", nargs="+", default=[2048],
                 type=cli.integer(1, tokens=True),
                 help="prompt tokens prefilled (time to the first token)")
  p.add_argument("--decode-prompt", default=2048,
                 type=cli.integer(1, tokens=True),
                 help="prompt tokens before decoding")
  p.add_argument("--new-tokens", default=64,
                 type=cli.integer(2),
                 help="greedy tokens decoded (the rate counts all but the "
                      "first, which prefill gives)")
  p.add_argument("--pairs", default=3, type=cli.integer(1),
                 help="(ours, theirs) process pairs per workload and length")
  p.add_argument("--repeats", default=1, type=cli.integer(1),
                 help="timed runs per process, after its warm-up")
  p.add_argument("--cpus", default=0, type=cli.integer(0, os.cpu_count()),
                 help="pin both sides to the first CPUS cores, PyTorch with "
                      "as many threads; 0: every core, PyTorch's default "
                      "threads")
  p.add_argument("--variant", default="flash", choices=("flash", "roll"),
                 help="our S²-Attn groups (theirs: the official roll); "
                      "roll computes what theirs does")
  model = p.add_argument_group("model (transformers LlamaConfig)")
  for flag, default, text in (
      ("hidden", 512, "hidden size"), ("layers", 8, "decoder layers"),
      ("intermediate", 1376, "MLP size"), ("vocab", 32000, "vocabulary")):
    model.add_argument(f"--{flag}", default=default, help=text,
                       type=cli.integer(1))
  cli.option(model, "--heads", default=8,
             help="attention heads (as many kv heads)")
  model.add_argument("--init-std", default=0.02,
                     type=cli.real(0),
                     help="std of the random weights (transformers' "
                          "initializer_range)")
  p.add_argument("--seed", default=0, type=cli.integer(0),
                 help="weights, prompts and LoRA")
  p.add_argument("--json", metavar="OUT", help="write the results here")
  args = p.parse_args(argv)
  check_args(args)
  return args


def check_args(args) -> None:
  """Shapes both sides take, before anything is built."""
  if args.hidden % args.heads or (args.hidden // args.heads) % 2:
    raise LongLoraError(
        f"--hidden {args.hidden} must split into --heads {args.heads} heads "
        "of an even size (RoPE rotates pairs)")
  if args.cpus and not hasattr(os, "sched_setaffinity"):
    raise LongLoraError("--cpus needs Linux (sched_setaffinity); leave it "
                        "out here")
  if "s2_step" in args.workloads:
    odd = [n for n in args.train_lengths if n % 8]
    if odd:
      raise LongLoraError(
          f"--train-lengths {odd[0]}: S²-Attn needs a multiple of 8 (groups "
          f"of a quarter, shifted by half a group), e.g. {odd[0] // 8 * 8} "
          f"or {odd[0] // 8 * 8 + 8}")


def configurations(args) -> list[tuple[str, int]]:
  """(workload, tokens) in the order they run."""
  lengths = {"s2_step": args.train_lengths, "full_step": args.train_lengths,
             "attention": args.train_lengths,
             "prefill": args.prefill_lengths, "decode": [args.decode_prompt]}
  return [(w, n) for w in args.workloads for n in lengths[w]]


def prompt_ids(args, length: int):
  import numpy as np
  return np.random.default_rng(args.seed).integers(
      0, args.vocab, (1, length)).astype(np.int32)


def attention_inputs(args, length: int):
  """q, k, v and the output's cotangent, `[1, seq, heads, head_dim]`."""
  import numpy as np
  rng = np.random.default_rng(args.seed)
  shape = (1, length, args.heads, args.hidden // args.heads)
  return [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]


def save_model(args, directory: str) -> dict:
  """The transformers model both sides load; returns library versions."""
  import peft
  import torch
  import transformers
  lengths = [n for _, n in configurations(args)]
  config = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden,
      intermediate_size=args.intermediate, num_hidden_layers=args.layers,
      num_attention_heads=args.heads, num_key_value_heads=args.heads,
      initializer_range=args.init_std,
      # Long enough for every workload: neither side scales RoPE.
      max_position_embeddings=max(lengths) + args.new_tokens,
      bos_token_id=None, eos_token_id=None, pad_token_id=None,
      tie_word_embeddings=False)
  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(args.seed)
  model = transformers.LlamaForCausalLM(config).float()
  model.save_pretrained(directory)
  return {"torch": torch.__version__, "transformers": transformers.__version__,
          "peft": peft.__version__}


def _timed(run, repeats: int) -> dict:
  """Runs `run` once untimed, then `repeats` times; `run` returns (seconds
  it measured itself or None for its wall time, extras)."""
  t = timing.timed(run, repeats, seconds=lambda result: result[0])
  return {"time_s": t.median_s, "times_s": list(t.times_s),
          "warmup_s": t.warmup_s, "first": t.first[1], **t.results[-1][1]}


def _clock(stamps: list):
  """(streaming callback, seconds per decoded token): times each new token
  after the first, which ends the prefill."""
  def per_token():
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 \
        else None
  return lambda *_: stamps.append(time.perf_counter()), per_token


def ours(workload: str, length: int, args, directory: str) -> dict:
  import jax
  import jax.numpy as jnp

  from longlora_jax.model import lora
  from longlora_jax.attention.dispatch import AttentionSpec
  from longlora_jax.model.generation import generate
  from longlora_jax.checkpoints.checkpoint import Checkpoint
  from longlora_jax.parallel.sharding import make_mesh
  from longlora_jax.training.recipe import RunSpec, TrainConfig
  from longlora_jax.training.step import initial_run_state, jit_train_step

  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")  # where PyTorch runs
  checkpoint = Checkpoint.open(directory)
  config = checkpoint.config
  params = checkpoint.params(jnp.float32)
  ids = prompt_ids(args, length)
  if workload.endswith("_step"):
    kind = "s2" if workload == "s2_step" else "full"
    recipe = TrainConfig(attention=AttentionSpec(kind=kind,
                                                 variant=args.variant),
                         dtype="float32", accum=1)
    spec = RunSpec(ckpt=directory, ctx=length,
                   base_config=config.to_hf_dict(), recipe=recipe,
                   seed=args.seed)
    mesh = make_mesh("fsdp=1", jax.devices()[:1])
    state = initial_run_state(spec, params, mesh)
    batch = {"input_ids": jnp.asarray(ids[None])}  # [accum, batch, seq]
    step, _, batch_sharding = jit_train_step(config, recipe, mesh, state,
                                             batch)
    batch = jax.device_put(batch, batch_sharding)

    trained = lora.count_params(state.trainable)

    def run():
      nonlocal state
      state, metrics = step(state, batch)
      return None, {"loss": float(metrics["loss"]), "trained": trained}
  elif workload == "attention":
    from longlora_jax.attention.dispatch import get_attention
    attend = get_attention("full")
    q, k, v, w = (jnp.asarray(x) for x in attention_inputs(args, length))
    value_and_grads = jax.jit(jax.value_and_grad(
        lambda q, k, v: jnp.sum(attend(q, k, v) * w), argnums=(0, 1, 2)))
    run = lambda: (None, {"loss": float(jax.block_until_ready(
        value_and_grads(q, k, v))[0])})
  else:
    def run():
      stamps = []
      stamp, per_token = _clock(stamps)
      new = 1 if workload == "prefill" else args.new_tokens
      t0 = time.perf_counter()
      tokens = generate(config, params, ids, max_new_tokens=new,
                        eos_token_id=None, on_token=stamp)
      seconds = per_token() if workload == "decode" else stamps[0] - t0
      return seconds, {"tokens": tokens[0].tolist()}
  return {"jax": jax.__version__, **_timed(run, args.repeats)}


def theirs(workload: str, length: int, args, directory: str) -> dict:
  import torch
  import transformers

  from tests.references import longlora_torch as recipe

  if args.cpus:
    torch.set_num_threads(args.cpus)
  torch.manual_seed(args.seed)
  ids = torch.tensor(prompt_ids(args, length), dtype=torch.long)
  if workload.endswith("_step"):
    model = recipe.recipe_model(directory, s2=workload == "s2_step")
    opt = recipe.optimizer(model)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    run = lambda: (None, {"loss": recipe.train_step(model, opt, ids),
                          "trained": trained})
  elif workload == "attention":
    q, k, v, w = (torch.tensor(x).transpose(1, 2)  # [batch, heads, seq, dim]
                  for x in attention_inputs(args, length))

    def run():
      leaves = [x.detach().requires_grad_() for x in (q, k, v)]
      loss = (torch.nn.functional.scaled_dot_product_attention(
          *leaves, is_causal=True) * w).sum()
      loss.backward()
      return None, {"loss": loss.item()}
  else:
    model = transformers.LlamaForCausalLM.from_pretrained(
        directory, dtype=torch.float32).eval()

    class Streamer:  # generate puts the prompt first, then each new token
      def __init__(self):
        self.stamps, self.prompt = [], True
        self.stamp, self.per_token = _clock(self.stamps)

      def put(self, value):
        if not self.prompt:
          self.stamp()
        self.prompt = False

      def end(self):
        pass

    def run():
      streamer = Streamer()
      new = 1 if workload == "prefill" else args.new_tokens
      t0 = time.perf_counter()
      with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=new, do_sample=False, streamer=streamer,
                             pad_token_id=0)
      seconds = (streamer.per_token() if workload == "decode"
                 else streamer.stamps[0] - t0)
      return seconds, {"tokens": out[0, length:].tolist()}
  return {"torch_threads": torch.get_num_threads(),
          **_timed(run, args.repeats)}


def _measure(job):
  """A spawned process's entry: (side, workload, tokens, args, model dir)."""
  side, workload, length, args, directory = job
  if args.cpus:  # before either framework starts its threads
    os.sched_setaffinity(0, range(args.cpus))
  import transformers
  transformers.utils.logging.disable_progress_bar()
  load = os.getloadavg()[0]  # other jobs on the machine, as it starts
  measure = ours if side == "ours" else theirs
  return {"load": load, "cpus": args.cpus or os.cpu_count(),
          **measure(workload, length, args, directory)}


def summarize(workload: str, length: int, runs: list[tuple[dict, dict]],
              new_tokens: int) -> dict:
  """One table row from the (ours, theirs) measurements of each pair."""
  span = lambda xs: {"median": statistics.median(xs), "min": min(xs),
                     "max": max(xs)}
  row = {"workload": workload, "tokens": length,
         "ours_s": span([o["time_s"] for o, _ in runs]),
         "theirs_s": span([t["time_s"] for _, t in runs]),
         "ratio": span([o["time_s"] / t["time_s"] for o, t in runs]),
         "pairs_s": [[o["time_s"], t["time_s"]] for o, t in runs],
         "ours_warmup_s": span([o["warmup_s"] for o, _ in runs]),
         "theirs_warmup_s": span([t["warmup_s"] for _, t in runs]),
         "load": span([r["load"] for pair in runs for r in pair])}
  if "loss" in runs[0][0]["first"]:
    # The first step's loss (the warm-up): LoRA starts as a no-op, so the
    # two sides compute the same loss (S²: with --variant roll).
    for key in ("loss", "trained"):
      if key in runs[0][0]["first"]:
        row[key] = {"ours": runs[0][0]["first"][key],
                    "theirs": runs[0][1]["first"][key]}
  else:
    row["tokens_equal"] = all(o["tokens"] == t["tokens"] for o, t in runs)
    row["ours_tokens"] = runs[0][0]["tokens"]
    row["theirs_tokens"] = runs[0][1]["tokens"]
  if workload == "decode":
    row["new_tokens"] = new_tokens
    row["ours_tok_s"] = 1 / row["ours_s"]["median"]
    row["theirs_tok_s"] = 1 / row["theirs_s"]["median"]
  return row


def format_row(row: dict) -> str:
  unit, scale = ("ms/tok", 1e3) if row["workload"] == "decode" else ("s", 1)
  value = lambda s: f"{scale * s['median']:.3g} {unit}"
  ratio = row["ratio"]
  check = {True: "equal", False: "DIFFER"}.get(row.get("tokens_equal"), "")
  return (f"{TITLES[row['workload']]:<16} {row['tokens']:>6} "
          f"{value(row['ours_s']):>14} {value(row['theirs_s']):>14} "
          f"{ratio['median']:>6.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})"
          f"{row['ours_warmup_s']['median']:>9.1f} s "
          f"{row['theirs_warmup_s']['median']:>6.1f} s "
          f"{row['load']['min']:>4.1f}-{row['load']['max']:<4.1f} {check}")


HEADER = (f"{'workload':<16} {'tokens':>6} {'ours':>14} {'theirs':>14} "
          f"{'ours/theirs (min-max)':>21} {'warm-up ours':>12} "
          f"{'theirs':>7} {'load':>9} tokens")


def _cpu() -> str:
  try:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    model = next(line.split(":", 1)[1].strip() for line in lines
                 if line.startswith("model name"))
  except (OSError, StopIteration):
    model = platform.processor() or platform.machine()
  return f"{os.cpu_count()} x {model}"


def main(argv=None):
  args = parse_args(argv)
  from tqdm.auto import tqdm

  configs = configurations(args)
  header = {"date": datetime.date.today().isoformat(), "cpu": _cpu(),
            "load_before": os.getloadavg(), "pairs": args.pairs,
            "repeats": args.repeats, "variant": args.variant,
            "cpus_given": args.cpus,
            "model": {k: getattr(args, k) for k in (
                "hidden", "layers", "heads", "intermediate", "vocab",
                "init_std")}}
  # Spawned: each measurement starts its framework afresh, alone.
  context = multiprocessing.get_context("spawn")
  rows = []
  with tempfile.TemporaryDirectory() as directory, \
      context.Pool(1, maxtasksperchild=1) as pool:
    header["versions"] = pool.apply(save_model, (args, directory))
    bar = tqdm(total=2 * args.pairs * len(configs), desc="vs torch",
               unit="run")
    print(HEADER, flush=True)
    for workload, length in configs:
      runs = []
      for pair in range(args.pairs):
        sides = ("ours", "theirs") if pair % 2 == 0 else ("theirs", "ours")
        result = {}
        for side in sides:
          result[side] = pool.apply(_measure, ((side, workload, length, args,
                                                directory),))
          bar.update()
        runs.append((result["ours"], result["theirs"]))
      header["versions"]["jax"] = runs[0][0]["jax"]
      header["torch_threads"] = runs[0][1]["torch_threads"]
      header["cpus"] = runs[0][0]["cpus"]
      rows.append(summarize(workload, length, runs, args.new_tokens))
      bar.write(format_row(rows[-1]))
    bar.close()
  header["load_after"] = os.getloadavg()
  if args.json:
    from longlora_jax.core.files import write_json
    write_json(args.json, dict(header, results=rows))
    print(f"wrote {args.json}")
  differ = [f"{r['workload']} at {r['tokens']}" for r in rows
            if r.get("tokens_equal") is False]
  if differ:
    raise LongLoraError(f"greedy tokens differ between ours and theirs "
                        f"({', '.join(differ)}); the two sides do not "
                        f"compute the same model")


if __name__ == "__main__":
  cli.run(main)
