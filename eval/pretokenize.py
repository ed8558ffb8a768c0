"""Tokenise a text corpus into a flat token file (.bin uint16 or .npy).

  python -m eval.pretokenize --tokenizer DIR --data book.txt --out book.bin
"""

from pathlib import Path

from longlora_jax.core import cli
from longlora_jax.data.text import iter_texts, tokenize_documents, write_tokens
from longlora_jax.core.files import check_writable
from longlora_jax.checkpoints.tokenizer import load_tokenizer
from longlora_jax.checkpoints.hub import TOKENIZER_FILES, resolve_checkpoint


def main(argv=None):
  p = cli.Parser(__doc__)
  p.add_argument("--tokenizer", required=True,
                 help="checkpoint directory or hf:ORG/NAME with a tokenizer")
  p.add_argument("--data", required=True,
                 help="text file(s) directory, file, or HF dataset name")
  p.add_argument("--text-field", default="text",
                 help="text column of records")
  p.add_argument("--max-tokens", type=cli.count, default=None,
                 help="stop after this many tokens")
  p.add_argument("--out", type=Path, required=True,
                 help="the token file to write (.bin or .npy)")
  args = p.parse_args(argv)
  check_writable(args.out.parent)
  tokenizer = load_tokenizer(resolve_checkpoint(args.tokenizer,
                                                patterns=TOKENIZER_FILES))
  tokens = tokenize_documents(
      tokenizer, iter_texts(args.data, text_field=args.text_field),
      max_tokens=args.max_tokens)
  write_tokens(args.out, tokens)
  print(f"wrote {len(tokens):,} tokens to {args.out}")


if __name__ == "__main__":
  cli.run(main)
