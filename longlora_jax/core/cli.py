"""Shared behaviour of the `python -m train.*`, `eval.*` and `bench.*`
commands: the parser (one-line errors, defaults in --help), the types that
check numbers at the door, the options several commands share (declared
once, in OPTIONS), and the wrapper that turns a user error into one line.
"""

import argparse
import copy
import math
import sys
from typing import Callable

from longlora_jax.core.errors import LongLoraError


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """The description as written; every option's default after its help."""

  def _format_action(self, action):
    default = action.default
    if (action.option_strings and action.help is not argparse.SUPPRESS
        and default not in (None, False, argparse.SUPPRESS)
        and "default" not in (action.help or "")):
      shown = " ".join(map(str, default)) if isinstance(
          default, (list, tuple)) else str(default)
      action = copy.copy(action)
      action.help = (f"{action.help} " if action.help else "") + (
          f"(default: {shown})".replace("%", "%%"))
    return super()._format_action(action)


class Parser(argparse.ArgumentParser):
  """argparse with the project's conventions: a wrong option is one line
  "error: ..." and exit code 2, as every other user error."""

  def __init__(self, description: str, **kwargs):
    """`description`: the command's docstring, shown as written."""
    super().__init__(description=description, formatter_class=_HelpFormatter,
                     **kwargs)

  def error(self, message):
    print(f"error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def _bounds(low, high, low_open: bool = False, high_open: bool = False
            ) -> str:
  if high is None:
    return f"> {low:g}" if low_open else f">= {low:g}"
  return (f"in {'(' if low_open else '['}{low:g}, {high:g}"
          f"{')' if high_open else ']'}")


def integer(low: int = 1, high: int | None = None, *,
            tokens: bool = False) -> Callable[[str], int]:
  """An argparse `type`: an integer in [low, high]; with `tokens`, a k
  suffix counts 1024, as RULER names its lengths (4k = 4096, 0.75k = 768)."""
  def parse(text: str) -> int:
    try:
      value = (float(text[:-1]) * 1024 if tokens and text[-1:] in ("k", "K")
               else int(text))
    except ValueError:
      value = math.nan
    if not (math.isfinite(value) and value == int(value) and value >= low
            and (high is None or value <= high)):
      raise argparse.ArgumentTypeError(
          f"{text!r} is not an integer {_bounds(low, high)}"
          + (" (e.g. 4096 or 4k)" if tokens else ""))
    return int(value)
  return parse


def real(low: float = 0.0, high: float | None = None, *,
         low_open: bool = False, high_open: bool = False
         ) -> Callable[[str], float]:
  """An argparse `type`: a finite number in [low, high] (an end excluded
  when open)."""
  def parse(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      value = math.nan
    if not (math.isfinite(value) and (value > low if low_open else value >= low)
            and (high is None or (value < high if high_open
                                  else value <= high))):
      raise argparse.ArgumentTypeError(
          f"{text!r} is not a finite number "
          f"{_bounds(low, high, low_open, high_open)}")
    return value
  return parse


# The ranges most options take.
count = integer(1)  # sizes, steps, lengths, trials
index = integer(0)  # seeds, steps counted from 0, warmup
positive = real(0.0, low_open=True)  # learning rates, scales
fraction = real(0.0, 1.0, low_open=True)  # ratios, top-p


DTYPES = ("bfloat16", "float32", "float16")

# Options that several commands take, declared once: `option(parser, name,
# **overrides)` adds one, with a command's own default or help where it
# differs (`help` overrides replace the text; `purpose` is put in front).
OPTIONS = {
    "--ckpt": dict(help="hf:ORG/NAME (through the Hugging Face cache), a "
                        "local checkpoint directory, or demo (the built-in "
                        "tiny model)"),
    "--mesh": dict(default="fsdp=-1",
                   help="device mesh as axis=size pairs over data, fsdp, "
                        "tensor and context (-1: the devices left), e.g. "
                        "fsdp=8, data=2,fsdp=4 or context=8"),
    "--dtype": dict(default="bfloat16", choices=DTYPES,
                    help="weights and compute"),
    "--quantize": dict(default="none", choices=("none", "nf4"),
                       help="frozen layer weights: nf4 keeps the attention "
                            "and MLP projections in 4 bits (QLoRA's "
                            "NormalFloat, double-quantized scales), "
                            "dequantized one layer at a time; embeddings, "
                            "norms, the LM head and LoRA stay in --dtype"),
    # model.remat.REMAT_POLICIES but "offload", which --offload picks.
    "--remat": dict(default="full", choices=("full", "nested", "dots", "none"),
                    help="activation checkpointing: full keeps each layer's "
                         "input; nested keeps one input per block of about "
                         "sqrt(layers) layers and recomputes the rest (one "
                         "more forward pass, far fewer inputs: 18 of 80); "
                         "dots also keeps the projections' outputs"),
    # attention.dispatch.AttentionSpec.by_group.
    "--s2-by-group": dict(
        action="store_true", default=None,
        help="run each layer's attention block (norm, q/k/v, S²-Attn, o) "
             "one S² group at a time, each recomputed in the backward pass: "
             "the attention's activations exist for half of the sequence "
             "at once (2 x G rows), at the cost of its forward once more"),
    # training.recipe.OFFLOADS.
    "--offload": dict(default="none", metavar="WHAT", choices=(
        "none", "activations", "optimizer", "activations,optimizer"),
        help="none, activations, optimizer or activations,optimizer: what "
             "waits in pinned host memory instead of GPU memory. "
             "activations: the layer inputs --remat full keeps for the "
             "backward pass; optimizer: AdamW's float32 masters and "
             "moments between updates (the same step; longer contexts "
             "fit)"),
    # What `checkpoints.checkpoint.model_config` reads.
    "--model": dict(default="llama2-7b",
                    help="a preset (llama2-7b/13b/70b, llama3.1-8b/70b, "
                         "qwen2.5-7b, mistral-7b, gemma2-9b, gemma3-4b, "
                         "olmo2-7b, phi3-mini), a checkpoint as --ckpt takes "
                         "it (HF or Meta's layout; only its config is read), "
                         "or a config.json"),
    "--heads": dict(type=count, default=32, help="query heads"),
    "--kv-heads": dict(type=count, default=None,
                       help="key/value heads (GQA; default: --heads)"),
    "--head-dim": dict(type=count, default=128),
    "--ctx": dict(type=count, default=None,
                  help="context the model was fine-tuned to; sets the linear "
                       "RoPE factor ceil(ctx / original) when the config has "
                       "none"),
    "--original-ctx": dict(type=count, default=None,
                           help="the context a checkpoint in Meta's layout "
                                "was released for (params.json does not "
                                "record it; default: told from its files, "
                                "e.g. 4096 for Llama 2)"),
    "--pi-factor": dict(type=real(1.0), default=None,
                        help="force this RoPE interpolation factor (e.g. the "
                             "paper's extended PI: a 32k model evaluated at "
                             "48k)"),
}


def option(parser, name: str, *, purpose: str = "", **overrides) -> None:
  """Adds the shared option `name` (a key of OPTIONS) to `parser` (a parser
  or an argument group); `overrides` replace its settings, `purpose` goes in
  front of its help."""
  kwargs = {**OPTIONS[name], **overrides}
  if purpose:
    kwargs["help"] = f"{purpose}: {kwargs['help']}" if kwargs.get("help") \
        else purpose
  parser.add_argument(name, **kwargs)


def model_options(parser) -> None:
  """The options of a command that loads a model to evaluate it (what
  `checkpoints.checkpoint.load_model` takes): --ckpt (required), --ctx,
  --pi-factor, --original-ctx, --dtype, --quantize, --mesh."""
  option(parser, "--ckpt", required=True)
  for name in ("--ctx", "--pi-factor", "--original-ctx", "--dtype",
               "--quantize", "--mesh"):
    option(parser, name)


def run(main: Callable[[], int | None]) -> None:
  """Runs `main`; a user error becomes one line on stderr and exit code 2."""
  try:
    code = main()
  except LongLoraError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
  sys.exit(code or 0)
