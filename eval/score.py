"""Score text with a Llama checkpoint: per-token loss, perplexity, next tokens.

  python -m eval.score --ckpt demo
  python -m eval.score --ckpt hf:meta-llama/Llama-2-7b-hf --text "Paris is"
"""

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp

from longlora_jax.checkpoints.checkpoint import load_model
from longlora_jax.core import cli
from longlora_jax.core.errors import LongLoraError
from longlora_jax.model.llama import forward

DEFAULT_TEXT = ("The quick brown fox jumps over the lazy dog. "
                "Long context models read whole books at once.")


def parse_args(argv=None):
  p = cli.Parser(__doc__)
  cli.option(p, "--ckpt", default="demo")
  p.add_argument("--text", default=DEFAULT_TEXT, help="the text to score")
  cli.option(p, "--dtype", default="float32")
  p.add_argument("--top-k", type=cli.count, default=5,
                 help="most likely next tokens shown")
  cli.option(p, "--mesh")
  cli.option(p, "--original-ctx")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  config, params, tokenizer, directory = load_model(
      args.ckpt, args.dtype, args.mesh, original_context=args.original_ctx)
  ids = tokenizer(args.text, return_tensors="np")["input_ids"]
  if ids.shape[1] < 2:
    raise LongLoraError("--text must encode to at least 2 tokens")
  logits = jax.jit(functools.partial(forward, config))(params, jnp.asarray(ids))
  logp = jax.nn.log_softmax(logits[0], axis=-1)
  nll = -jnp.take_along_axis(logp[:-1], jnp.asarray(ids[0, 1:, None]), 1)[:, 0]
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"checkpoint   {Path(directory)}")
  print(f"model        {n_params / 1e6:.2f}M params, {config.num_hidden_layers} "
        f"layers, context {config.max_position_embeddings}, RoPE factor "
        f"{config.rope_factor:g}")
  print(f"tokens       {ids.shape[1]}")
  print(f"loss         {float(nll.mean()):.4f} nats/token")
  print(f"perplexity   {math.exp(float(nll.mean())):.2f}")
  top = jnp.argsort(-logp[-1])[:args.top_k]
  shown = ", ".join(f"{tokenizer.decode([int(t)])!r} {float(jnp.exp(logp[-1, t])):.3f}"
                    for t in top)
  print(f"next token   {shown}")


if __name__ == "__main__":
  cli.run(main)
