"""What the evaluation commands share: model/tokenizer loading and output."""

import dataclasses
import json
import os
from pathlib import Path

from longlora_jax.config import RopeScaling
from longlora_jax.errors import LongLoraError
from longlora_jax.hf_io import load_hf, resolve_checkpoint


def add_model_args(parser) -> None:
  parser.add_argument("--ckpt", required=True,
                      help="HF checkpoint directory or hf:ORG/NAME")
  parser.add_argument("--ctx", type=int, default=None,
                      help="context the model was fine-tuned to; sets the "
                           "linear RoPE factor ceil(ctx / original) when the "
                           "config has none")
  parser.add_argument("--pi-factor", type=float, default=None,
                      help="force this RoPE interpolation factor (e.g. the "
                           "paper's extended PI: a 32k model evaluated at 48k)")
  parser.add_argument("--dtype", default="bfloat16",
                      choices=("bfloat16", "float32", "float16"))


def load_model(args):
  """(config, params, tokenizer, directory) with the RoPE factor applied."""
  from transformers import AutoTokenizer
  directory = resolve_checkpoint(args.ckpt)
  config, params = load_hf(directory, dtype=args.dtype)
  if args.pi_factor is not None:
    if args.pi_factor < 1:
      raise LongLoraError(f"--pi-factor must be >= 1, got {args.pi_factor}")
    config = dataclasses.replace(
        config, rope_scaling=RopeScaling(args.pi_factor)
        if args.pi_factor > 1 else None)
  elif args.ctx and config.rope_scaling is None:
    config = config.with_context(args.ctx)
  try:
    tokenizer = AutoTokenizer.from_pretrained(directory)
  except (OSError, ValueError) as e:
    raise LongLoraError(f"{directory}: no usable tokenizer ({e})") from None
  return config, params, tokenizer, directory


def write_json(path: Path, obj) -> None:
  """Written to a temporary name, then renamed: never half-written."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(obj, indent=2) + "\n")
  os.replace(tmp, path)


def save_plot(path: Path, xs, ys, *, xlabel: str, ylabel: str, title: str,
              logy: bool = False, marker: str | None = "o") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(xs, ys, marker=marker)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if logy:
    ax.set_yscale("log")
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  tmp = path.with_name(f".{path.name}.tmp.png")
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)
