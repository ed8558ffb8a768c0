"""What the evaluation commands share: their model options and loading."""

import dataclasses

from longlora_jax.core import cli
from longlora_jax.model.config import RopeScaling
from longlora_jax.checkpoints.checkpoint import Checkpoint, param_shardings
from longlora_jax.parallel.sharding import make_mesh


def add_model_args(parser) -> None:
  parser.add_argument("--ckpt", required=True,
                      help="HF checkpoint directory, hf:ORG/NAME, or demo")
  parser.add_argument("--ctx", type=cli.count, default=None,
                      help="context the model was fine-tuned to; sets the "
                           "linear RoPE factor ceil(ctx / original) when the "
                           "config has none")
  parser.add_argument("--pi-factor", type=cli.real(1.0), default=None,
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
    config = dataclasses.replace(
        config, rope_scaling=RopeScaling(args.pi_factor)
        if args.pi_factor > 1 else None)
  elif args.ctx and config.rope_scaling is None:
    config = config.with_context(args.ctx)
  params = sharded_params(checkpoint, args.dtype, args.mesh)
  return config, params, checkpoint.tokenizer, checkpoint.directory
