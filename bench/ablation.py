"""The paper's two findings at the demo's scale: every arm of its ablation
(attention patterns, trainable parts, no training) from one base, on the
same data, seed and steps, each evaluated with full attention.

  python -m bench.ablation [--out runs/bench/ablation] [--steps N]

The base is the built-in `demo` checkpoint extended 4x (256 -> 1024 tokens)
with the demo's recipe (`longlora_jax.demo.defaults`); every trained arm is
a `train.extend` run of the library (`training.run`) that differs from the
others in one option only. Each arm is evaluated by the official perplexity
protocol at the native and the extended length on the held-out files, with
full attention. Per arm: trainable parameters, the median step time and
tokens/s, the peak host memory of its training (anonymous RSS: on a CPU the
device is the host), and the loss of every step.

The arms listed in `CLOSE` (expected to come out close) run once per
--seeds; the others with its first seed. Writes ablation.json, ablation.md
(the table) and loss.png (every arm's loss curve) into --out; an arm
already finished there is not run again (results of other settings are
refused). Progress goes to stderr.
"""

import contextlib
import dataclasses
import json
import platform
import shutil
import sys
import time
from pathlib import Path

from bench.resident import Peak
from bench.timing import Timing
from longlora_jax.core import cli
from longlora_jax.core.cpus import usable_cpus

_MB = 2**20


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm: `options` of `train.extend` over the demo's (None: the base
  model evaluated with `rope` and no training)."""
  name: str
  label: str
  options: dict | None
  rope: str | None = "linear"


ARMS = (
    Arm("full_attn", "full attention, LoRA+", {"attention": "full"}),
    Arm("s2_flash", "S²-Attn flash, LoRA+ (ours)", {}),
    Arm("s2_roll", "S²-Attn roll, LoRA+ (the paper's)",
        {"s2_variant": "roll"}),
    Arm("no_shift", "short attention, no shift, LoRA+",
        {"s2_variant": "none"}),
    Arm("lora_only", "S²-Attn, LoRA only (q,k,v,o)", {"mode": "lora"}),
    Arm("lora_embed", "S²-Attn, LoRA + embeddings", {"mode": "lora+embed"}),
    Arm("lora_norm", "S²-Attn, LoRA + norms", {"mode": "lora+norm"}),
    Arm("full_ft", "S²-Attn, full fine-tuning", {"mode": "full"}),
    Arm("pi", "PI, no training", None, "linear"),
    Arm("yarn", "YaRN, no training", None, "yarn"),
    Arm("base", "base model, no interpolation", None, None),
)
BY_NAME = {arm.name: arm for arm in ARMS}
# The arms whose differences are the findings' (run with every seed).
CLOSE = ("full_attn", "s2_flash", "s2_roll", "no_shift", "full_ft")
LAST = 10  # the final loss: the mean of the last steps' losses


def parse_args(argv=None):
  from longlora_jax.demo.defaults import EXTEND
  p = cli.Parser(__doc__)
  cli.option(p, "--ckpt", required=False, default="demo",
             help="the base checkpoint (default: the built-in demo)")
  cli.option(p, "--ctx", help="the extended context (default 4x the base's)")
  p.add_argument("--data", help="training data (default: the demo's "
                 "training split of the standard library)")
  p.add_argument("--heldout", help="evaluation data (default: the demo's "
                 "held-out split)")
  # Half the demo's batch, half its steps: more updates for the tokens
  # that fit 30 minutes on 2 cores (13 trained runs).
  p.add_argument("--steps", type=cli.count, default=100,
                 help="optimizer steps of every trained arm (default 100; "
                 f"the demo's {EXTEND.options['steps']})")
  p.add_argument("--batch", type=cli.count, default=4,
                 help="rows per step (default 4; the demo's "
                 f"{EXTEND.options['batch']})")
  p.add_argument("--lr", type=cli.positive, default=EXTEND.options["lr"],
                 help=f"peak learning rate (default the demo's "
                 f"{EXTEND.options['lr']:g})")
  p.add_argument("--arms", type=_names, default=tuple(BY_NAME),
                 help="comma-separated arms (default all: "
                 f"{','.join(BY_NAME)})")
  p.add_argument("--seeds", type=_seeds, default=(0, 1),
                 help=f"seeds of the close arms ({','.join(CLOSE)}); the "
                 "others run the first (default 0,1)")
  p.add_argument("--windows", type=cli.count, default=24,
                 help="perplexity windows per length (default 24)")
  p.add_argument("--out", type=Path, default=Path("runs/bench/ablation"),
                 help="output directory (default runs/bench/ablation)")
  return p.parse_args(argv)


def _names(text: str) -> tuple[str, ...]:
  import argparse
  names = tuple(n for n in text.split(",") if n)
  unknown = [n for n in names if n not in BY_NAME]
  if unknown or not names:
    raise argparse.ArgumentTypeError(
        f"unknown arms {unknown}; choose from {','.join(BY_NAME)}")
  return names


def _seeds(text: str) -> tuple[int, ...]:
  return tuple(cli.index(s) for s in text.split(",") if s)


def recipe(args, arm: Arm, seed: int) -> dict:
  """The `train.extend` options of `arm`'s run: the demo's recipe, one
  checkpoint at the end."""
  from longlora_jax.demo.defaults import EXTEND
  return {**EXTEND.options, "ckpt": args.ckpt, "ctx": args.ctx,
          "data": args.data, "steps": args.steps, "batch": args.batch,
          "lr": args.lr, "seed": seed, "save_every": args.steps, "keep": 1,
          **arm.options}


def trainable_params(options: dict, base_config) -> int:
  """Trainable parameters of the run of `options`, from shapes alone."""
  import functools

  import jax
  import jax.numpy as jnp
  from longlora_jax.model import lora
  from longlora_jax.model.llama import init_params
  from longlora_jax.parallel.sharding import make_mesh
  from longlora_jax.training.options import make_spec
  from longlora_jax.training.step import initial_run_state
  spec = make_spec(options, task="extend",
                   base_config=base_config.to_hf_dict())
  mesh = make_mesh(spec.mesh)
  params = jax.eval_shape(functools.partial(
      init_params, base_config, dtype=jnp.float32), jax.random.key(0))
  state = jax.eval_shape(lambda p: initial_run_state(spec, p, mesh), params)
  return lora.count_params(state.trainable)


def _perplexities(args, config, params, tokens) -> dict:
  from longlora_jax.evaluation.perplexity import evaluate
  return {str(n): evaluate(config, params, tokens, n, max_windows=args.windows,
                           batch_size=8, attention="full")["perplexity"]
          for n in (args.native, args.ctx)}


def _train(args, arm: Arm, seed: int, run_dir: Path, base, tokens) -> dict:
  """Trains `arm` into `run_dir` and evaluates its merged model."""
  from longlora_jax.checkpoints.checkpoint import Checkpoint
  from longlora_jax.parallel.sharding import batch_parallelism, make_mesh
  from longlora_jax.training.loop import read_metrics
  from longlora_jax.training.run import run
  from longlora_jax.training.tasks import EXTEND
  options = recipe(args, arm, seed)
  count = trainable_params(options, base.config)
  if run_dir.exists():  # an earlier try stopped in it
    shutil.rmtree(run_dir)
  tick = time.time()
  with Peak(every_s=0.02) as memory, contextlib.redirect_stdout(sys.stderr):
    outcome = run(options, task=EXTEND, out=run_dir)
  wall = time.time() - tick
  metrics = read_metrics(run_dir)
  seconds = [m["step_seconds"] for m in metrics]
  # The first step is left out as timing's warm-up (compilation is not in
  # it, but first touches are).
  timing = Timing(tuple(seconds[1:] or seconds), (), seconds[0], None)
  merged = Checkpoint.open(outcome.written["hf"])
  rows = args.batch * batch_parallelism(make_mesh(outcome.spec.mesh))
  losses = [m["loss"] for m in metrics]
  return {"trainable_params": count, "losses": losses,
          "final_loss": sum(losses[-LAST:]) / len(losses[-LAST:]),
          "step_s": timing.median_s,
          "tokens_per_s": rows * args.ctx / timing.median_s,
          "rss_peak_mb": memory.peak / _MB,
          "rss_added_mb": (memory.peak - memory.before) / _MB,
          "train_wall_s": wall,
          "ppl": _perplexities(args, merged.config, merged.params("float32"),
                               tokens)}


def _untrained(args, arm: Arm, base, tokens) -> dict:
  from longlora_jax.training.tasks import EXTEND
  config = (base.config if arm.rope is None else
            EXTEND.target_config(base.config, args.ctx, arm.rope))
  return {"trainable_params": 0, "losses": [],
          "ppl": _perplexities(args, config, base.params("float32"), tokens)}


def _plan(args) -> list[tuple[Arm, int]]:
  """(arm, seed) runs: the first seed of every arm (trained ones first),
  then the close arms' other seeds."""
  arms = [BY_NAME[n] for n in args.arms]
  arms.sort(key=lambda a: a.options is None)
  return [(a, args.seeds[0]) for a in arms] + [
      (a, s) for s in args.seeds[1:] for a in arms
      if a.name in CLOSE and a.options is not None]


def _spread(values: list[float]) -> dict:
  mean = sum(values) / len(values)
  return {"mean": mean, "spread": (max(values) - min(values)) / 2,
          "values": values}


def summarise(runs: list[dict]) -> list[dict]:
  """Per arm, in `ARMS` order: the mean and half range over its seeds."""
  rows = []
  for arm in ARMS:
    mine = [r for r in runs if r["arm"] == arm.name]
    if not mine:
      continue
    row = {"arm": arm.name, "label": arm.label,
           "seeds": [r["seed"] for r in mine],
           "trainable_params": mine[0]["trainable_params"],
           "ppl": {n: _spread([r["ppl"][n] for r in mine])
                   for n in mine[0]["ppl"]}}
    for key in ("final_loss", "step_s", "tokens_per_s", "rss_peak_mb",
                "rss_added_mb"):
      if key in mine[0]:
        row[key] = _spread([r[key] for r in mine])
    rows.append(row)
  return rows


def _cell(stat: dict | None, form: str) -> str:
  if stat is None:
    return "–"
  text = format(stat["mean"], form)
  return text + (f" ± {stat['spread']:{form}}"
                 if len(stat["values"]) > 1 else "")


def table(result: dict) -> str:
  """The Markdown table of `result` (what ablation.json holds)."""
  native, ctx = (str(n) for n in result["lengths"])
  lines = [
      f"| arm | trainable params | step (s) | tokens/s | peak RSS (MB) | "
      f"loss, last {LAST} steps | ppl@{native} | ppl@{ctx} | seeds |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  for row in result["arms"]:
    get = row.get
    lines.append(
        f"| {row['label']} | {row['trainable_params']:,} | "
        f"{_cell(get('step_s'), '.3f')} | {_cell(get('tokens_per_s'), ',.0f')}"
        f" | {_cell(get('rss_peak_mb'), ',.0f')} | "
        f"{_cell(get('final_loss'), '.3f')} | "
        f"{_cell(row['ppl'][native], '.3f')} | "
        f"{_cell(row['ppl'][ctx], '.3f')} | "
        f"{','.join(map(str, row['seeds']))} |")
  s = result["settings"]
  lines.append(
      f"\n{s['ckpt']} extended {s['native']} -> {s['ctx']} tokens; "
      f"{s['steps']} steps of {s['batch']} x {s['ctx']} tokens at lr "
      f"{s['lr']:g}; perplexity: official protocol, full attention, "
      f"{s['windows']} windows per length over {result['heldout_tokens']:,} "
      "held-out tokens; ± is half the range over the seeds; peak RSS is the "
      "process's anonymous resident memory during the arm's training (a CPU "
      "run: the device is the host)")
  return "\n".join(lines)


def _plot(out: Path, result: dict, runs: list[dict]) -> None:
  from longlora_jax.core.plots import save_lines
  lines = {}
  for row in result["arms"]:
    curves = [r["losses"] for r in runs if r["arm"] == row["arm"]
              and r["losses"]]
    if curves:
      n = min(map(len, curves))
      lines[row["label"]] = (list(range(1, n + 1)),
                             [sum(c[i] for c in curves) / len(curves)
                              for i in range(n)])
  s = result["settings"]
  save_lines(out / "loss.png", lines, xlabel="step",
             ylabel="training loss (nats/token), mean over seeds",
             title=f"{s['ckpt']} {s['native']} -> {s['ctx']} tokens: the "
                   "ablation's arms", marker=None)


def main(argv=None):
  args = parse_args(argv)
  from longlora_jax.core.errors import LongLoraError
  from longlora_jax.core.files import check_writable, write_json, write_text
  if not Path("/proc/self/status").exists():
    raise LongLoraError("this benchmark reads Linux's /proc/self for the "
                        "host memory; run it on Linux")
  check_writable(args.out)
  import jax
  from longlora_jax.checkpoints.checkpoint import Checkpoint
  from longlora_jax.demo.report import stream_tokens
  from longlora_jax.demo.stdlib import demo_data
  base = Checkpoint.open(args.ckpt)
  args.native = base.config.context
  args.ctx = args.ctx or 4 * args.native
  if args.data is None or args.heldout is None:
    train, heldout = demo_data()
    args.data, args.heldout = args.data or str(train), args.heldout or str(
        heldout)
  settings = {k: getattr(args, k) for k in (
      "ckpt", "native", "ctx", "data", "heldout", "steps", "batch", "lr",
      "windows")}
  tokens = stream_tokens(args.heldout, base.tokenizer, base.eos_id)
  runs_dir = args.out / "runs"
  runs_dir.mkdir(parents=True, exist_ok=True)
  plan, runs, tick = _plan(args), [], time.time()
  for i, (arm, seed) in enumerate(plan, 1):
    file = runs_dir / f"{arm.name}-seed{seed}.json"
    say = lambda text: print(f"[{i}/{len(plan)}] {arm.name} seed {seed}: "
                             f"{text}", file=sys.stderr, flush=True)
    if file.exists():
      done = json.loads(file.read_text())
      if done["settings"] != settings:
        raise LongLoraError(
            f"{file} holds a run of other settings ({done['settings']}); "
            "choose another --out")
      say("finished before, not run again")
      runs.append(done)
      continue
    say(f"{arm.label}")
    start = time.time()
    r = (_untrained(args, arm, base, tokens) if arm.options is None else
         _train(args, arm, seed, args.out / "runs" / f"{arm.name}-seed{seed}",
                base, tokens))
    r.update(arm=arm.name, label=arm.label, seed=seed, settings=settings,
             wall_s=time.time() - start)
    write_json(file, r)
    say(f"ppl {', '.join(f'@{n} {v:.3f}' for n, v in r['ppl'].items())}; "
        f"{r['wall_s']:.0f} s")
    runs.append(r)
  result = {"settings": settings, "lengths": [args.native, args.ctx],
            "heldout_tokens": int(len(tokens)),
            "arms": summarise(runs), "runs": runs,
            "wall_s_this_invocation": time.time() - tick,
            "machine": f"{platform.machine()}, {usable_cpus()} CPUs",
            "versions": {"python": platform.python_version(),
                         "jax": jax.__version__},
            "date": time.strftime("%Y-%m-%d", time.gmtime())}
  write_json(args.out / "ablation.json", result)
  text = table(result)
  write_text(args.out / "ablation.md", text + "\n")
  _plot(args.out, result, runs)
  print(text)
  print(f"wrote {args.out / 'ablation.json'}, {args.out / 'ablation.md'}, "
        f"{args.out / 'loss.png'}", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
