"""The options of `train.extend` and `train.sft`: one parser, built from a
task and the defaults of the checkpoint its command starts from, and the
mapping between a flat dict of options (what the command line gives) and a
`RunSpec`. An option's name is the field it sets (`--lr` sets
`TrainConfig.lr`), except the attention options, which set `AttentionSpec`
fields (`--full-attn`: kind, `--group-ratio`, `--s2-variant`: variant,
`--s2-impl`: implementation)."""

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

from longlora_jax.core import cli
from longlora_jax.attention.dispatch import IMPLEMENTATIONS, AttentionSpec
from longlora_jax.attention.groups import VARIANTS
from longlora_jax.core.errors import LongLoraError
from longlora_jax.checkpoints.gguf import QTYPES
from longlora_jax.training.recipe import RunSpec, TrainConfig
from longlora_jax.training.tasks import Task

# Options a resumed run may change (a new --lr, e.g. after a NaN, makes it
# another run from there on; --gguf only adds an export); the others must
# stay the run's.
RESUMABLE = ("steps", "lr", "save_every", "keep", "gguf")
# Option -> AttentionSpec field.
_ATTENTION = {"attention": "kind", "group_ratio": "group_ratio",
              "s2_variant": "variant", "s2_impl": "implementation",
              "s2_by_group": "by_group"}
_RECIPE = tuple(f.name for f in dataclasses.fields(TrainConfig)
                if f.name != "attention")
_RUN = tuple(f.name for f in dataclasses.fields(RunSpec)
             if f.name not in ("recipe", "base_config", "task"))


@dataclasses.dataclass(frozen=True)
class CheckpointDefaults:
  """A checkpoint's own defaults for the runs of one command, where its
  command line says nothing: chosen by the command, applied by the engine
  to the runs of `ckpt` (and to a new run given no --ckpt).

  options: option name -> value, as `make_spec` takes them; data: makes
  and names the default --data (called only when a run takes it), which
  `data_help` describes; out: the default run directory, where a new run
  replaces the one before.
  """
  ckpt: str
  options: Mapping[str, Any]
  out: Path
  data: Callable[[], str] | None = None
  data_help: str = ""


def make_spec(options: dict, *, task: Task | str,
              base_config: dict) -> RunSpec:
  """A RunSpec of `task` from `options` (names as in `options_of`); the
  others take their defaults (--data: the task's)."""
  unknown = set(options) - {*_ATTENTION, *_RECIPE, *_RUN}
  if unknown:
    raise ValueError(f"unknown run options {sorted(unknown)}")
  pick = lambda names: {k: options[k] for k in names if k in options}
  if options.get("attention") == "full" and options.get("s2_impl", "auto") != (
      "auto"):
    raise LongLoraError("--s2-impl chooses how S²-Attn runs; drop it with "
                        "--full-attn")
  if options.get("attention") == "full" and options.get("s2_by_group"):
    raise LongLoraError("--s2-by-group runs S²-Attn's groups; drop it with "
                        "--full-attn")
  if options.get("quantize", "none") != "none" and options.get("mode") == (
      "full"):
    raise LongLoraError("--full-ft trains every weight, and 4-bit weights "
                        "stay frozen; train LoRA+ (drop --full-ft) or drop "
                        "--quantize")
  attention = AttentionSpec(**{_ATTENTION[k]: v
                               for k, v in pick(_ATTENTION).items()})
  recipe = TrainConfig(attention=attention, **pick(_RECIPE))
  return RunSpec(task=task, base_config=base_config, recipe=recipe,
                 **pick(_RUN))


def options_of(spec: RunSpec) -> dict:
  """The flat options that `make_spec` turns into `spec`."""
  attention = spec.recipe.attention
  return {**{k: getattr(attention, f) for k, f in _ATTENTION.items()},
          **{k: getattr(spec.recipe, k) for k in _RECIPE},
          **{k: getattr(spec, k) for k in _RUN}}


def default(name: str):
  """The default of option `name` (for help texts)."""
  for cls, names in ((AttentionSpec, {v: k for k, v in _ATTENTION.items()}),
                     (TrainConfig, {}), (RunSpec, {})):
    for f in dataclasses.fields(cls):
      if names.get(f.name, f.name) == name:
        return f.default
  raise KeyError(name)


def given(args: argparse.Namespace) -> dict:
  """The options set on the command line."""
  names = {*_ATTENTION, *_RECIPE, *_RUN}
  return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _shown(name: str, defaults: CheckpointDefaults | None,
           form: str = "") -> str:
  """Option `name`'s default for its help text, and the checkpoint
  defaults' value where they set one."""
  text = format(default(name), form)
  if defaults and name in defaults.options:
    text += f"; {defaults.ckpt} {format(defaults.options[name], form)}"
  return f"({text})"


def parser(task: Task, doc: str,
           defaults: CheckpointDefaults | None = None
           ) -> argparse.ArgumentParser:
  """The command line of `task`'s command, with the `defaults` of the
  checkpoint a run takes when given no --ckpt (None: --ckpt is needed)."""
  d = lambda name, form="": _shown(name, defaults, form)
  own = lambda name: (f" ({defaults.ckpt}: {defaults.options[name]})"
                      if defaults and name in defaults.options else "")
  p = cli.Parser(doc)
  cli.option(p, "--ckpt", help=task.help["ckpt"] + (
      f", or {defaults.ckpt} (the default)" if defaults else ""))
  p.add_argument("--ctx", type=cli.count, help=task.help["ctx"] + own("ctx"))
  cli.option(p, "--original-ctx")
  p.add_argument("--data", help=f"{task.help['data']} (default {task.data}"
                 + (f"; {defaults.ckpt}: {defaults.data_help})"
                    if defaults and defaults.data else ")"))
  if task.text_field:
    p.add_argument("--text-field",
                   help=f"text column of records {d('text_field')}")
  p.add_argument("--out", type=Path, help=f"run directory (default "
                 f"runs/{task.name}/NAME-CTX" + (
                     f"; {defaults.ckpt}: {defaults.out})" if defaults
                     else ")"))
  p.add_argument("--gguf", choices=tuple(QTYPES),
                 help="also write the merged model as RUN/model-TYPE.gguf "
                      "for llama.cpp, its matrices of this type (default: "
                      "none)")
  p.add_argument("--resume", action="store_true",
                 help="continue the run in --out from its last checkpoint")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--full-ft", dest="mode", action="store_const",
                    const="full", help="train every weight instead of LoRA+")
  mode.add_argument("--lora-only", dest="mode", action="store_const",
                    const="lora", help="LoRA without the trainable embedding "
                    "and norms")
  p.add_argument("--lora-rank", type=cli.count, help=d("lora_rank"))
  p.add_argument("--lora-alpha", type=cli.positive, help=d("lora_alpha", "g"))
  p.add_argument("--full-attn", dest="attention", action="store_const",
                 const="full", help="train with full attention, not S²-Attn")
  p.add_argument("--group-ratio", type=cli.fraction, help="S²-Attn group "
                 f"size as a fraction of --ctx {d('group_ratio')}")
  p.add_argument("--s2-variant", choices=VARIANTS, help=d("s2_variant"))
  p.add_argument("--s2-impl", choices=IMPLEMENTATIONS,
                 help="S²-Attn implementation: auto (the fastest that takes "
                      "the shapes here), cudnn (grouped cuDNN attention, "
                      "NVIDIA), pallas (the fused Pallas/Triton kernel), dense "
                      "(dense groups), chunked (flash-style, any group size), "
                      "pallas_interpret (the kernel interpreted; tests)"
                      f" {d('s2_impl')}")
  cli.option(p, "--s2-by-group")
  # No argparse default: a resumed run keeps its own unless given.
  cli.option(p, "--mesh", default=None,
             help=f"{cli.OPTIONS['--mesh']['help']} {d('mesh')}")
  p.add_argument("--rope", choices=("auto", "linear", "yarn"),
                 help="how RoPE reaches --ctx: linear position interpolation "
                      "by ceil(ctx / original context) (LongLoRA's), or YaRN "
                      "with that factor; auto: linear, except that a llama3 "
                      "or yarn config keeps its type with the factor times "
                      f"ceil(ctx / its context) {d('rope')}")
  p.add_argument("--batch", type=cli.count, help="micro-batch per "
                 f"data-parallel device {d('batch')}")
  p.add_argument("--accum", type=cli.count, help="gradient accumulation "
                 f"steps {d('accum')}")
  p.add_argument("--steps", type=cli.count, help=f"optimizer steps "
                 f"{d('steps')}")
  p.add_argument("--lr", type=cli.positive, help="peak learning rate "
                 f"{d('lr', 'g')}")
  p.add_argument("--warmup", type=cli.index, help=f"linear warmup steps "
                 f"{d('warmup')}")
  p.add_argument("--beta2", type=cli.real(0.0, 1.0, high_open=True),
                 help=f"AdamW beta2 {d('beta2')}: what the official scripts "
                 "run (HF Trainer's default); the paper states 0.95")
  p.add_argument("--weight-decay", type=cli.real(0.0),
                 help=d("weight_decay", "g"))
  cli.option(p, "--dtype", default=None, choices=("bfloat16", "float32"),
             help=f"frozen weights, compute and export {d('dtype')}")
  cli.option(p, "--quantize", default=None,
             help=f"{cli.OPTIONS['--quantize']['help']} {d('quantize')}")
  cli.option(p, "--remat", default=None,
             help=f"{cli.OPTIONS['--remat']['help']} {d('remat')}")
  cli.option(p, "--offload", default=None,
             help=f"{cli.OPTIONS['--offload']['help']} {d('offload')}")
  p.add_argument("--seed", type=cli.index, help="LoRA initialisation and "
                 f"data order {d('seed')}")
  p.add_argument("--save-every", type=cli.count, help="checkpoint every N "
                 f"steps {d('save_every')}")
  p.add_argument("--keep", type=cli.count, help="checkpoints kept, the "
                 f"newest {d('keep')}")
  return p
