"""Ask a question about a long document; the answer streams as it is made.

  python -m eval.chat --ckpt DIR --material book.txt --question "Who is Ahab?"
"""

import sys
import time
from pathlib import Path

import jax
import numpy as np

from longlora_jax.checkpoints.checkpoint import load_model
from longlora_jax.core import cli
from longlora_jax.core.errors import LongLoraError
from longlora_jax.model.generation import generate
from longlora_jax.data.sft import CHAT_PROMPT


def parse_args(argv=None):
  p = cli.Parser(__doc__)
  cli.model_options(p)
  p.add_argument("--material", type=Path, required=True,
                 help="a (long) .txt document the question is about")
  p.add_argument("--question", required=True)
  p.add_argument("--max-gen-len", type=cli.count, default=512,
                 help="most tokens to generate")
  p.add_argument("--temperature", type=cli.real(0.0), default=0.6,
                 help="sampling temperature (0: greedy)")
  p.add_argument("--top-p", type=cli.fraction, default=0.9,
                 help="nucleus sampling mass")
  p.add_argument("--seed", type=cli.index, default=0, help="sampling seed")
  p.add_argument("--chunk-size", type=cli.count, default=2048,
                 help="prefill tokens per step")
  return p.parse_args(argv)


class Streamer:
  """Prints the decoded text as tokens arrive (whole-text diff, so pieces
  that only make sense together, like SentencePiece spaces, come out right)."""

  def __init__(self, tokenizer, out=None):
    self.tokenizer, self.out = tokenizer, out or sys.stdout
    self.ids, self.shown = [], ""

  def __call__(self, tokens):
    self.ids.append(int(tokens[0]))
    text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
    # Hold back a trailing replacement char: a multi-byte character may be
    # split across tokens.
    if text.endswith("\ufffd"):
      return
    self.out.write(text[len(self.shown):])
    self.out.flush()
    self.shown = text


def main(argv=None):
  args = parse_args(argv)
  if args.material.is_dir():
    raise LongLoraError(f"--material {args.material}: is a directory; pass "
                        "a .txt file")
  if not args.material.is_file():
    raise LongLoraError(f"--material {args.material}: no such file")
  config, params, tokenizer, _ = load_model(
      args.ckpt, args.dtype, args.mesh, ctx=args.ctx, pi_factor=args.pi_factor,
      original_context=args.original_ctx, quantize=args.quantize)
  material = args.material.read_text(encoding="utf-8", errors="replace")
  prompt = CHAT_PROMPT.format(material=material, question=args.question)
  ids = np.asarray(tokenizer(prompt)["input_ids"], np.int32)[None]
  limit = config.context
  print(f"prompt: {ids.shape[1]:,} tokens (model context {int(limit):,})",
        file=sys.stderr)
  if ids.shape[1] > limit:
    print(f"warning: the prompt is longer than the {int(limit):,} tokens the "
          "model was trained for; expect worse answers", file=sys.stderr)
  streamer = Streamer(tokenizer)
  start = time.perf_counter()
  out = generate(config, params, ids, max_new_tokens=args.max_gen_len,
                 temperature=args.temperature, top_p=args.top_p,
                 key=jax.random.key(args.seed), chunk_size=args.chunk_size,
                 on_token=streamer)
  seconds = time.perf_counter() - start
  print(file=sys.stdout)
  print(f"{out.shape[1]} tokens in {seconds:.1f} s "
        f"({out.shape[1] / seconds:.1f} tokens/s, prefill included)",
        file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
