"""What the evaluation commands share: their model options and loading."""

import dataclasses
import math

from longlora_jax.config import RopeScaling
from longlora_jax.errors import LongLoraError
from longlora_jax.io.checkpoint import Checkpoint, param_shardings
from longlora_jax.sharding import make_mesh


def add_model_args(parser) -> None:
  parser.add_argument("--ckpt", required=True,
                      help="HF checkpoint directory, hf:ORG/NAME, or demo")
  parser.add_argument("--ctx", type=int, default=None,
                      help="context the model was fine-tuned to; sets the "
                           "linear RoPE factor ceil(ctx / original) when the "
                           "config has none")
  parser.add_argument("--pi-factor", type=float, default=None,
                      help="force this RoPE interpolation factor (e.g. the "
                           "paper's extended PI: a 32k model evaluated at 48k)")
  parser.add_argument("--dtype", default="bfloat16",
                      choices=("bfloat16", "float32", "float16"))
  add_mesh_arg(parser)


def add_mesh_arg(parser) -> None:
  parser.add_argument("--mesh", default="fsdp=-1",
                      help="device mesh the weights (and the KV cache) are "
                           "sharded over, e.g. fsdp=8 or fsdp=4,tensor=2 "
                           "(default: every device on fsdp)")


def sharded_params(checkpoint: Checkpoint, dtype, mesh: str):
  """The weights straight into their shards on the --mesh: no device holds
  the whole model."""
  return checkpoint.params(dtype, param_shardings(checkpoint.config,
                                                  make_mesh(mesh)))


def load_model(args):
  """(config, params, tokenizer, directory) with the RoPE factor applied."""
  checkpoint = Checkpoint.open(args.ckpt)
  config = checkpoint.config
  if args.pi_factor is not None:
    if args.pi_factor < 1:
      raise LongLoraError(f"--pi-factor must be >= 1, got {args.pi_factor}")
    config = dataclasses.replace(
        config, rope_scaling=RopeScaling(args.pi_factor)
        if args.pi_factor > 1 else None)
  elif args.ctx and config.rope_scaling is None:
    config = config.with_context(args.ctx)
  params = sharded_params(checkpoint, args.dtype, args.mesh)
  return config, params, checkpoint.tokenizer, checkpoint.directory


def number(flag: str, *, lo: float | None = None, hi: float | None = None,
           kind=int, tokens: bool = False):
  """An argparse type: a finite `kind` in [lo, hi], else a one-line error
  naming `flag`. With `tokens`, a k suffix counts 1024 tokens, as RULER
  names its lengths (4k = 4096, 128k = 131072)."""
  def parse(text: str):
    scale = 1
    if tokens and text[-1:] in ("k", "K"):
      text, scale = text[:-1], 1024
    try:
      value = float(text) * scale if kind is float or scale > 1 else \
          kind(text)
    except ValueError:
      raise LongLoraError(f"{flag} {text!r}: expected "
                          f"{'an integer' if kind is int else 'a number'}"
                          f"{' (e.g. 4096 or 4k)' if tokens else ''}") \
          from None
    if not math.isfinite(value) or (kind is int and value != int(value)):
      raise LongLoraError(f"{flag} {text!r}: expected a finite "
                          f"{'integer' if kind is int else 'number'}")
    value = kind(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
      bounds = (f"between {lo:g} and {hi:g}" if hi is not None
                else f"at least {lo:g}")
      raise LongLoraError(f"{flag} {text}{'k' if scale > 1 else ''}: must "
                          f"be {bounds}")
    return value
  return parse
