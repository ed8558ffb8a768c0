"""Extend a Llama's context window with LongLoRA (S²-Attn + linear PI + LoRA+).

  python -m train.extend                                  # built-in demo, CPU
  python -m train.extend --ckpt hf:meta-llama/Llama-2-7b-hf --ctx 100000

Trains with shifted sparse attention at the target context, the RoPE
positions interpolated by ceil(ctx / original), and LoRA on the attention
projections plus the embedding and norms; then writes the merged model (HF
format) and the PEFT adapter into the run directory. Interrupt it (Ctrl-C,
SIGTERM) and `--resume` continues the same run exactly.

With no arguments it extends the built-in tiny model (native context 256)
to 1024 tokens on the CPU in a few minutes and prints perplexity and
passkey retrieval of the base model, the base model with position
interpolation but no training, and the extended model.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from longlora_jax import checkpoint, cli, demo, lora, sft
from longlora_jax.config import LlamaConfig
from longlora_jax.data import (Position, batches, document_tokens, packed_rows,
                               prefetch)
from longlora_jax.distributed import (global_batch, initialize_from_env,
                                      process_slice)
from longlora_jax.errors import CheckpointError, LongLoraError
from longlora_jax.flops import peak_flops, step_flops
from longlora_jax.hf_io import load_hf, resolve_checkpoint, save_hf
from longlora_jax.peft_io import save_peft
from longlora_jax.s2_attention import VARIANTS, s2_attention, s2_group_size
from longlora_jax.sharding import batch_parallelism, make_mesh
from longlora_jax.train_step import (TrainConfig, init_state, jit_train_step,
                                     params_of)

REDPAJAMA = "togethercomputer/RedPajama-Data-1T-Sample"
LONGALPACA = "Yukang/LongAlpaca-12k"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
# Recipe defaults: the official LongLoRA fine-tuning (8 GPUs x micro-batch 1
# x accumulation 8, AdamW at 2e-5 with 20 warmup steps then constant, no
# weight decay, bf16, gradient checkpointing, LoRA rank 8 / alpha 16 on
# q,k,v,o plus the embedding and norms, S²-Attn groups of ctx/4). beta2 is
# 0.999, what the official scripts run (HF Trainer's default); the paper
# states 0.95.
DEFAULTS = dict(data=REDPAJAMA, text_field="text", mode="lora+", lora_rank=8,
                lora_alpha=16.0, attention="s2", group_ratio=0.25,
                s2_variant="flash", mesh="fsdp=-1", batch=1, accum=8,
                steps=1000, lr=2e-5, warmup=20, beta2=0.999, weight_decay=0.0,
                dtype="bfloat16", remat="full", seed=0, save_every=100, keep=2)
# The demo's recipe where it differs: a 1M-parameter byte-level model
# adapts to PI in a few hundred steps at a higher learning rate; float32
# because CPUs have no fast bfloat16.
DEMO = dict(ctx=1024, steps=200, batch=8, accum=1, lr=2e-3, dtype="float32",
            remat="none")
# Options a resumed run may change (a new --lr, e.g. after a NaN, makes it
# another run from there on); the others must stay the run's.
_RESUMABLE = ("steps", "lr", "save_every", "keep")
MODES = {"lora+": lora.LORA_PLUS, "lora": ()}


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Everything that defines a run; saved as run.json in its directory."""
  ckpt: str
  ctx: int
  data: str
  text_field: str
  mode: str  # "lora+", "lora" or "full"
  lora_rank: int
  lora_alpha: float
  attention: str  # "s2" or "full"
  group_ratio: float
  s2_variant: str
  mesh: str
  batch: int
  accum: int
  steps: int
  lr: float
  warmup: int
  beta2: float
  weight_decay: float
  dtype: str
  remat: str
  seed: int
  save_every: int
  keep: int
  base_config: dict  # the base checkpoint's config.json, to recognise it
  task: str = "extend"  # "extend" (packed documents) or "sft" (instructions)


def parse_args(argv=None, task: str = "extend", doc: str = __doc__):
  d = DEFAULTS
  p = argparse.ArgumentParser(
      description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  if task == "extend":
    p.add_argument("--ckpt", help="hf:ORG/NAME, a local HF checkpoint "
                   "directory, or demo (the default)")
    p.add_argument("--ctx", type=int, help="target context in tokens (demo: "
                   f"{DEMO['ctx']})")
    p.add_argument("--data", help="HF dataset name (streamed), .txt/.md/"
                   ".jsonl/.json/.parquet file or a directory of them, or a "
                   f".bin/.npy token file (default {REDPAJAMA}; demo: the "
                   "Python standard library's source)")
    p.add_argument("--text-field",
                   help=f"text column of records ({d['text_field']})")
  else:
    p.add_argument("--ckpt", help="hf:ORG/NAME or a local HF checkpoint "
                   "directory, usually a context-extended model")
    p.add_argument("--ctx", type=int, help="tokens per packed row (its RoPE "
                   "scaling is kept, or raised to ceil(ctx / original))")
    p.add_argument("--data", help="{instruction, output[, input]} records: "
                   "HF dataset name, .json/.jsonl/.parquet file or a "
                   f"directory of them (default {LONGALPACA})")
  p.add_argument("--out", type=Path, help=f"run directory (default "
                 f"runs/{task}/NAME-CTX" + ("; demo: runs/demo/extend)"
                                            if task == "extend" else ")"))
  p.add_argument("--resume", action="store_true",
                 help="continue the run in --out from its last checkpoint")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--full-ft", dest="mode", action="store_const",
                    const="full", help="train every weight instead of LoRA+")
  mode.add_argument("--lora-only", dest="mode", action="store_const",
                    const="lora", help="LoRA without the trainable embedding "
                    "and norms")
  p.add_argument("--lora-rank", type=int, help=f"({d['lora_rank']})")
  p.add_argument("--lora-alpha", type=float, help=f"({d['lora_alpha']:g})")
  p.add_argument("--full-attn", dest="attention", action="store_const",
                 const="full", help="train with full attention, not S²-Attn")
  p.add_argument("--group-ratio", type=float, help="S²-Attn group size as a "
                 f"fraction of --ctx ({d['group_ratio']})")
  p.add_argument("--s2-variant", choices=VARIANTS,
                 help=f"({d['s2_variant']})")
  p.add_argument("--mesh", help="device mesh (fsdp=-1: all devices on "
                 "fsdp; e.g. data=2,fsdp=4)")
  p.add_argument("--batch", type=int, help="micro-batch per data-parallel "
                 f"device ({d['batch']}; demo {DEMO['batch']})")
  p.add_argument("--accum", type=int, help="gradient accumulation steps "
                 f"({d['accum']}; demo {DEMO['accum']})")
  p.add_argument("--steps", type=int, help="optimizer steps "
                 f"({d['steps']}; demo {DEMO['steps']})")
  p.add_argument("--lr", type=float, help="peak learning rate "
                 f"({d['lr']:g}; demo {DEMO['lr']:g})")
  p.add_argument("--warmup", type=int, help=f"linear warmup steps ({d['warmup']})")
  p.add_argument("--beta2", type=float, help=f"AdamW beta2 ({d['beta2']}, "
                 "as the official scripts run; the paper states 0.95)")
  p.add_argument("--weight-decay", type=float, help=f"({d['weight_decay']:g})")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), help="frozen "
                 f"weights, compute and export ({d['dtype']}; demo "
                 f"{DEMO['dtype']})")
  p.add_argument("--remat", choices=("full", "dots", "none"), help="activation "
                 f"checkpointing ({d['remat']}; demo {DEMO['remat']})")
  p.add_argument("--seed", type=int, help="LoRA initialisation and data order "
                 f"({d['seed']})")
  p.add_argument("--save-every", type=int, help="checkpoint every N steps "
                 f"({d['save_every']})")
  p.add_argument("--keep", type=int, help="checkpoints kept, the newest "
                 f"({d['keep']})")
  args = p.parse_args(argv)
  args.task = task
  return args


# ---- the run's specification ----

def _given(args) -> dict:
  """The RunSpec fields set on the command line."""
  fields = {f.name for f in dataclasses.fields(RunSpec)}
  return {k: v for k, v in vars(args).items() if k in fields and v is not None}


def _is_demo_default(args) -> bool:
  return (args.task == "extend" and args.ckpt in (None, "demo")
          and args.out is None)


def _run_dir(args) -> Path:
  """--out, else the demo's runs/demo/extend, else runs/extend/NAME-CTX."""
  if args.out is not None:
    return args.out
  if args.ckpt in (None, "demo"):
    return Path("runs") / "demo" / args.task
  name = args.ckpt.rstrip("/").split("/")[-1].split("@")[0]
  return Path("runs") / args.task / f"{name}-{args.ctx}"


def _spec_from_args(args, ckpt: str, base_config: LlamaConfig) -> RunSpec:
  demo_run = ckpt == "demo" and args.task == "extend"
  values = {**DEFAULTS, **(DEMO if demo_run else {}),
            **({"data": LONGALPACA} if args.task == "sft" else {}),
            **_given(args), "ckpt": ckpt, "task": args.task,
            "base_config": base_config.to_hf_dict()}
  if demo_run and args.data is None:
    values["data"] = str(demo.demo_data()[0])
  return RunSpec(**values)


def _resumed_spec(args, saved: RunSpec, run_dir: Path,
                  base_config: LlamaConfig) -> RunSpec:
  """The saved spec with the options a resumed run may change; a different
  model, context or recipe is refused."""
  given = _given(args)
  if given.pop("task") != saved.task:
    raise LongLoraError(
        f"{run_dir} is a run of train.{saved.task}; resume it with "
        f"python -m train.{saved.task} --resume --out {run_dir}")
  if given.get("ckpt", saved.ckpt) != saved.ckpt:
    raise LongLoraError(
        f"{run_dir} is a run of --ckpt {saved.ckpt}, not of {args.ckpt}; "
        "resume it with that checkpoint, or start a new run with another --out")
  if base_config.to_hf_dict() != saved.base_config:
    raise LongLoraError(
        f"{run_dir} was started from another model than the one {saved.ckpt} "
        "holds now (its config.json differs); resume it with the original "
        "checkpoint")
  if given.get("ctx", saved.ctx) != saved.ctx:
    raise LongLoraError(
        f"{run_dir} extends to --ctx {saved.ctx}, not {args.ctx}; resume it "
        "with that context, or start a new run with another --out")
  for name, value in given.items():
    if name not in _RESUMABLE and value != getattr(saved, name):
      raise LongLoraError(
          f"--{name.replace('_', '-')} {value} differs from this run's "
          f"{getattr(saved, name)}; a resumed run keeps its recipe (only "
          f"{', '.join('--' + n.replace('_', '-') for n in _RESUMABLE)} can "
          "change)")
  return dataclasses.replace(
      saved, **{k: v for k, v in given.items() if k in _RESUMABLE})


def target_config(spec: RunSpec, config: LlamaConfig) -> LlamaConfig:
  """The base config with the RoPE scaling the run trains with: linear PI by
  ceil(ctx / original context). Fine-tuning keeps a larger factor the
  checkpoint already has (an extended model tuned on shorter rows)."""
  target = config.with_context(spec.ctx)
  if spec.task == "sft" and config.rope_factor >= target.rope_factor:
    return config
  return target


def _check_ctx(spec: RunSpec, config: LlamaConfig) -> None:
  original = config.original_context
  if spec.task == "extend" and spec.ctx <= original:
    raise LongLoraError(
        f"--ctx {spec.ctx} is not larger than the checkpoint's context of "
        f"{original} tokens; extend it, e.g. --ctx {2 * original} or --ctx "
        f"{4 * original}")
  if spec.attention != "s2":
    return
  if config.num_attention_heads % 2:
    raise LongLoraError(
        f"S²-Attn shifts half of the attention heads, and this model has "
        f"{config.num_attention_heads}; train with --full-attn")

  def valid(ctx):
    try:
      s2_group_size(ctx, config.num_attention_heads,
                    group_ratio=spec.group_ratio)
      return ctx > original or spec.task == "sft"
    except ValueError:
      return False
  if not valid(spec.ctx):
    lowest = original if spec.task == "extend" else 0
    below = next((c for c in range(spec.ctx - 1, lowest, -1) if valid(c)),
                 None)
    above = next((c for c in range(spec.ctx + 1, 4 * spec.ctx + 64)
                  if valid(c)), None)
    nearest = " or ".join(str(c) for c in (below, above) if c)
    raise LongLoraError(
        f"--ctx {spec.ctx} does not split into S²-Attn groups of "
        f"{spec.group_ratio:g} x ctx tokens (an even group size that divides "
        f"the context); nearest valid: {nearest or 'none'}")


def train_config(spec: RunSpec) -> TrainConfig:
  if spec.attention == "full":
    attention = "chunked"  # Full attention, flash-style: O(ctx) memory.
  elif (spec.group_ratio, spec.s2_variant) == (0.25, "flash"):
    attention = "s2"
  else:
    attention = functools.partial(s2_attention, group_ratio=spec.group_ratio,
                                  variant=spec.s2_variant)
  return TrainConfig(
      attention=attention, remat=spec.remat, compute_dtype=spec.dtype,
      accum_steps=spec.accum, learning_rate=spec.lr, warmup_steps=spec.warmup,
      total_steps=spec.steps, b2=spec.beta2, weight_decay=spec.weight_decay)


def initial_state(spec: RunSpec, params, tc: TrainConfig):
  """The run's state at step 0 from the base `params`: LoRA added (seeded)
  and the trainable set split off."""
  if spec.mode == "full":
    return init_state(params, lora.full_mask(params), tc)
  params = lora.add_lora(params, rank=spec.lora_rank, alpha=spec.lora_alpha,
                         key=jax.random.key(spec.seed))
  return init_state(params, lora.trainable_mask(params, MODES[spec.mode]), tc)


def read_spec(run_dir: Path) -> RunSpec:
  file = run_dir / RUN_FILE
  if not file.exists():
    raise LongLoraError(f"{run_dir}: no {RUN_FILE}; not a train.extend run "
                        "directory")
  try:
    return RunSpec(**json.loads(file.read_text()))
  except (json.JSONDecodeError, TypeError) as e:
    raise LongLoraError(f"{file}: not a run record of this version ({e})") from None


def _write_json(path: Path, obj) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(obj, indent=2) + "\n")
  os.replace(tmp, path)


def base_directory(ckpt: str) -> Path:
  return demo.demo_checkpoint() if ckpt == "demo" else resolve_checkpoint(ckpt)


# ---- outputs ----

def write_outputs(spec: RunSpec, config: LlamaConfig, params,
                  targets: dict[str, Path], *, overwrite: bool = True
                  ) -> dict[str, Path]:
  """Writes `params` (the run's tree, LoRA nodes included) to each of
  `targets`: "hf" the merged model, "peft" the adapter; `config` carries
  the RoPE scaling. Each directory appears only once complete."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() != 0:
    return {}
  if "peft" in targets and spec.mode == "full":
    raise LongLoraError("a full fine-tuning run has no adapter; export it "
                        "as --format hf")
  dtype = jnp.dtype(spec.dtype)
  written = {}
  if "hf" in targets:
    merged = jax.tree.map(lambda x: x.astype(dtype), lora.merge(params))
    written["hf"] = save_hf(config, merged, targets["hf"],
                            tokenizer_from=base_directory(spec.ckpt),
                            dtype=dtype, overwrite=overwrite)
  if "peft" in targets:
    written["peft"] = save_peft(
        config, params, targets["peft"], extra=MODES[spec.mode],
        base_model_name_or_path=spec.ckpt, dtype=dtype, overwrite=overwrite)
  return written


def print_commands(spec: RunSpec, config: LlamaConfig,
                   written: dict[str, Path]) -> None:
  """How to evaluate (or chat with) what was written; `config` is the
  trained one, with its RoPE scaling."""
  if "hf" in written:
    hf = written["hf"]
    print(f"\nmerged model (HF format): {hf}")
    if spec.task == "sft":
      print("ask it about a long document with:\n  python -m eval.chat "
            f"--ckpt {hf} --material FILE.txt --question \"...\"")
    else:
      interval = max(spec.ctx // 8, 274)  # The protocol needs >= 274 tokens.
      data = spec.data
      if spec.ckpt == "demo":
        train, heldout = map(str, demo.demo_data())
        data = heldout if data == train else data
      print(f"evaluate it with:\n"
            f"  python -m eval.perplexity --ckpt {hf} --data {data} "
            f"--seq-len {config.original_context} {spec.ctx}\n"
            f"  python -m eval.passkey --ckpt {hf} --max-tokens {spec.ctx} "
            f"--interval {interval}")
  if "peft" in written:
    # rope_theta inside too: transformers 5 reads it from there.
    rope = {"type": "linear", "rope_type": "linear",
            "factor": config.rope_factor, "rope_theta": config.rope_theta}
    print(f"\nPEFT adapter (LoRA + modules_to_save): {written['peft']}\n"
          "load it on the base model with the RoPE scaling it was trained "
          f"with:\n  LlamaForCausalLM.from_pretrained(BASE, rope_scaling={rope})"
          f"\n  PeftModel.from_pretrained(model, '{written['peft']}')")


# ---- training ----

class _Interrupt:
  """SIGINT/SIGTERM set a flag the loop checks after each step."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGINT, signal.SIGTERM):
      self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum is not None:  # A second signal: stop now.
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc):
    for s, handler in self._old.items():
      signal.signal(s, handler)


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x))
                              for x in jax.tree.leaves(tree)]))


def _tensorboard(directory: Path):
  """A SummaryWriter when TensorBoard is installed, else None."""
  for module in ("tensorboardX", "torch.utils.tensorboard"):
    try:
      import importlib
      return importlib.import_module(module).SummaryWriter(str(directory))
    except ImportError:
      continue
  return None


def _data(spec: RunSpec, tokenizer, eos_id: int, start: Position, shape):
  """Prefetched (batch of [*shape, ctx] arrays, position after it) pairs."""
  if spec.task == "sft":
    rows = _sft_rows(spec, tokenizer, eos_id, start)
  else:
    docs = document_tokens(spec.data, tokenizer, eos_id=eos_id,
                           text_field=spec.text_field)
    rows = (({"input_ids": row}, position) for row, position in packed_rows(
        docs, spec.ctx, seed=spec.seed, start=start, source=spec.data))
  return prefetch(batches(rows, shape))


def _sft_rows(spec: RunSpec, tokenizer, eos_id: int, start: Position):
  examples, truncated = sft.load_examples(spec.data, tokenizer, spec.ctx)
  if truncated:
    print(f"warning: {truncated} of {len(examples)} examples are longer than "
          f"--ctx {spec.ctx} tokens and were truncated")
  pad_id = tokenizer.pad_token_id
  yield from sft.sft_rows(examples, spec.ctx,
                          eos_id if pad_id is None else pad_id,
                          seed=spec.seed, start=start)


def _latest(directory: Path) -> int | None:
  if not directory.exists():
    return None
  return checkpoint.manager(directory, read_only=True).latest_step()


def _spec(args, run_dir: Path) -> tuple[RunSpec, Path, LlamaConfig]:
  """(spec, base checkpoint directory, its config), checked."""
  if args.resume:
    saved = read_spec(run_dir)
    base = base_directory(saved.ckpt)
    config = LlamaConfig.from_pretrained(base)
    spec = _resumed_spec(args, saved, run_dir, config)
  else:
    if args.task == "sft" and args.ckpt is None:
      raise LongLoraError("--ckpt is required: the model to fine-tune, e.g. "
                          "the merged model of a train.extend run "
                          "(runs/demo/extend/hf)")
    ckpt = args.ckpt or "demo"
    base = base_directory(ckpt)
    config = LlamaConfig.from_pretrained(base)
    if args.ctx is None and ckpt != "demo":
      raise LongLoraError(
          "--ctx is required: " + ("the context to extend to, e.g. --ctx "
                                   f"{4 * config.original_context}"
                                   if args.task == "extend" else
                                   "the tokens per training row"))
    spec = _spec_from_args(args, ckpt, config)
    if run_dir.exists() and any(run_dir.iterdir()) and not (
        _is_demo_default(args) and (run_dir / RUN_FILE).exists()):
      raise LongLoraError(
          f"{run_dir} is not empty; continue its run with --resume, or "
          "choose another --out")
  _check_ctx(spec, config)
  for name in ("batch", "accum", "steps", "save_every", "keep", "lora_rank"):
    if getattr(spec, name) < 1:
      raise LongLoraError(f"--{name.replace('_', '-')} must be >= 1")
  return spec, base, config


def main(argv=None, task: str = "extend", doc: str = __doc__) -> int:
  """The command (`task`: "extend", or "sft" for train.sft); returns its exit
  code (128 + signal when interrupted)."""
  args = parse_args(argv, task, doc)
  initialize_from_env()
  from transformers import AutoTokenizer

  run_dir = _run_dir(args)
  spec, base, config = _spec(args, run_dir)
  ext_config = target_config(spec, config)
  try:
    tokenizer = AutoTokenizer.from_pretrained(base)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{base}: no usable tokenizer ({e})") from None
  eos_id = tokenizer.eos_token_id
  if eos_id is None:
    eos_id = int(np.atleast_1d(config.eos_token_id)[0])

  mesh = make_mesh(spec.mesh)
  rows = spec.batch * batch_parallelism(mesh)
  mngr_dir = run_dir / "checkpoints"
  step0 = _latest(mngr_dir) if args.resume else None
  record = {} if step0 is None else checkpoint.read_record(
      checkpoint.manager(mngr_dir, read_only=True), step0)
  data = _data(spec, tokenizer, eos_id, Position(**record.get("data", {})),
               (spec.accum, rows))
  try:
    first = next(data)  # Bad data fails here, before anything is written.
    _, params = load_hf(base, dtype=spec.dtype)
    tc = train_config(spec)
    state = initial_state(spec, params, tc)
    del params
    shape = {k: jax.ShapeDtypeStruct(v.shape, jnp.int32)
             for k, v in first[0].items()}
    step_fn, s_shard, b_shard = jit_train_step(ext_config, tc, mesh, state,
                                               shape)
    state = jax.device_put(state, s_shard)

    if not args.resume and run_dir.exists():
      shutil.rmtree(run_dir)  # The demo's previous default run: start afresh.
    run_dir.mkdir(parents=True, exist_ok=True)
    mngr = checkpoint.manager(mngr_dir, keep=spec.keep)
    try:
      if step0 is not None:
        state, _ = checkpoint.restore(mngr, step0, state)
      if jax.process_index() == 0:
        _write_json(run_dir / RUN_FILE, dataclasses.asdict(spec))
        _truncate_metrics(run_dir / METRICS_FILE, int(state.step))
      print(f"{spec.ckpt}: context {config.original_context} -> {spec.ctx} "
            f"(RoPE x{ext_config.rope_factor:g}), {spec.mode}, "
            f"{'S²-Attn' if spec.attention == 's2' else 'full attention'}, "
            f"{lora.count_params(state.trainable) / 1e6:.2f}M trainable "
            f"parameters; {rows * spec.accum} x {spec.ctx} tokens per step "
            f"on {mesh.size} device(s); run directory {run_dir}")
      state, signum = _loop(spec, ext_config, mesh, state, step_fn, b_shard,
                            first, data, mngr, step0, run_dir)
    finally:
      mngr.wait_until_finished()
      mngr.close()
  finally:
    data.close()
  if jax.process_index() == 0:
    _plot_loss(run_dir, spec)
  if signum is not None:
    print(f"\n{signal.Signals(signum).name}: stopped after step "
          f"{int(state.step)}; saved checkpoint {mngr_dir / str(int(state.step))}"
          f"\nresume with: python -m train.{spec.task} --resume --out {run_dir}")
    return 128 + signum

  targets = {"hf": run_dir / "hf"}
  if spec.mode != "full":
    targets["peft"] = run_dir / "peft"
  written = write_outputs(spec, ext_config, params_of(state), targets)
  print_commands(spec, ext_config, written)
  if spec.ckpt == "demo" and spec.task == "extend" and "hf" in written:
    report = demo.report(spec.ctx, written["hf"])
    _write_json(run_dir / "report.json", report)
    print(f"\n{demo.format_report(report)}\nwrote {run_dir / 'report.json'}")
  return 0


def _loop(spec, config, mesh, state, step_fn, b_shard, first, data, mngr,
          last_saved, run_dir):
  """Steps to `spec.steps`, logging and checkpointing; (state, the signal
  that stopped it or None)."""
  rows = spec.batch * batch_parallelism(mesh)
  local = process_slice(rows)
  main_process = jax.process_index() == 0
  flops = step_flops(config, spec.ctx, batch=rows * spec.accum,
                     group_size=(int(spec.ctx * spec.group_ratio)
                                 if spec.attention == "s2" else None))
  peak = peak_flops(jax.devices()[0])
  tb = _tensorboard(run_dir / "tensorboard") if main_process else None
  log = open(run_dir / METRICS_FILE, "a") if main_process else None
  first_step = int(state.step)
  bar = tqdm(total=spec.steps, initial=first_step, desc=spec.task, unit="step",
             disable=not main_process)
  batch, position = first
  tick = time.time()
  try:
    with _Interrupt() as interrupt:
      for i in range(first_step, spec.steps):
        if i > first_step:
          batch, position = next(data)
        batch = {k: v[:, local].astype(np.int32) for k, v in batch.items()}
        state, metrics = step_fn(state, (
            global_batch(batch, b_shard, rows) if jax.process_count() > 1
            else jax.device_put(batch, b_shard)))
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        step, seconds, tick = i + 1, now - tick, now
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
          _stop_on_nan(mngr, step, m, last_saved, run_dir)
        # Every token of every row is computed; "tokens" counts the scored.
        m.update(step=step, step_seconds=seconds,
                 tokens_per_s=rows * spec.accum * spec.ctx / seconds)
        if peak:
          m["mfu"] = flops / seconds / (peak * mesh.size)
        if log is not None:
          log.write(json.dumps(m) + "\n")
          log.flush()
        if tb is not None:
          for k, v in m.items():
            tb.add_scalar(f"train/{k}", v, step)
        bar.set_postfix(loss=f"{m['loss']:.4f}",
                        tok_s=f"{m['tokens_per_s']:,.0f}",
                        **({"mfu": f"{m['mfu']:.1%}"} if peak else {}))
        bar.update(1)
        stop = interrupt.signum is not None
        if step % spec.save_every == 0 or step == spec.steps or stop:
          if not bool(_all_finite(state.trainable)):
            _stop_on_nan(mngr, step, m, last_saved, run_dir)
          checkpoint.save(mngr, state, {"data": dataclasses.asdict(position),
                                        "loss": m["loss"]}, force=True)
          last_saved = step
        if stop:
          return state, interrupt.signum
  finally:
    bar.close()
    if log is not None:
      log.close()
    if tb is not None:
      tb.close()
  return state, None


def _stop_on_nan(mngr, step, m, last_saved, run_dir):
  mngr.wait_until_finished()
  kept = (f"the last good checkpoint is step {last_saved} in "
          f"{run_dir / 'checkpoints'} (continue from it with --resume, e.g. "
          "with a lower --lr)" if last_saved is not None else
          "no checkpoint was saved before it")
  raise LongLoraError(f"loss {m['loss']} (grad norm {m['grad_norm']}) at "
                      f"step {step}: training stopped; {kept}")


def _plot_loss(run_dir: Path, spec: RunSpec) -> None:
  """loss.png: the training loss per step, from metrics.jsonl."""
  from eval.common import save_plot
  metrics = [json.loads(line) for line in
             (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
  if metrics:
    save_plot(run_dir / "loss.png", [m["step"] for m in metrics],
              [m["loss"] for m in metrics], xlabel="step",
              ylabel="loss (nats/token)", marker=None,
              title=f"{Path(spec.ckpt).name} -> {spec.ctx} tokens ({spec.task})")


def _truncate_metrics(file: Path, step: int) -> None:
  """Drops logged steps after `step` (a resumed run logs them again)."""
  if not file.exists():
    return
  lines = [line for line in file.read_text().splitlines()
           if line.strip() and json.loads(line)["step"] <= step]
  tmp = file.with_name(f".{file.name}.tmp")
  tmp.write_text("".join(line + "\n" for line in lines))
  os.replace(tmp, file)


if __name__ == "__main__":
  cli.run(main)
