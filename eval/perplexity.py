"""Perplexity of a checkpoint on a long corpus at several context lengths.

  python -m eval.perplexity --ckpt DIR --data pg19_test.bin --seq-len 4096 8192 32768
"""

from pathlib import Path

from tqdm.auto import tqdm

from longlora_jax.attention.dispatch import ATTENTION_FNS
from longlora_jax.checkpoints.checkpoint import load_model
from longlora_jax.core import cli
from longlora_jax.data.text import (TOKEN_SUFFIXES, iter_texts, load_tokens,
                               tokenize_documents)
from longlora_jax.core.files import check_writable, write_json
from longlora_jax.evaluation.perplexity import MODES, evaluate, window_starts
from longlora_jax.core.plots import save_plot


def parse_args(argv=None):
  p = cli.Parser(__doc__)
  cli.model_options(p)
  p.add_argument("--data", required=True,
                 help="token file (.bin uint16 / .npy), text file(s) or "
                      "directory, or a HF dataset name")
  p.add_argument("--seq-len", type=cli.integer(2, tokens=True), nargs="+",
                 default=[2048, 4096],
                 help="context lengths in tokens (32k = 32768, or the "
                      "trained length, e.g. 100000)")
  p.add_argument("--stride", type=cli.count, default=256,
                 help="tokens between window starts")
  p.add_argument("--mode", choices=MODES, default="official",
                 help="official: the LongLoRA script's windows; sliding: "
                      "every token scored once")
  p.add_argument("--batch-size", type=cli.count, default=1,
                 help="windows per forward pass")
  p.add_argument("--max-windows", type=cli.count, default=None,
                 help="evaluate this many evenly spaced windows per length "
                      "(default: all, as the official protocol)")
  p.add_argument("--max-tokens", type=cli.integer(1, tokens=True),
                 default=None,
                 help="when tokenising text, stop after this many tokens")
  p.add_argument("--attention", default="full",
                 choices=[n for n in ATTENTION_FNS if n != "s2"],
                 help="full: full attention by the fastest implementation "
                      "here (cuDNN or the Pallas kernel on NVIDIA GPUs, "
                      "chunked elsewhere); or by one: dense (short contexts "
                      "only), chunked, pallas")
  p.add_argument("--out", type=Path, default=Path("runs/perplexity"),
                 help="directory for perplexity.json and perplexity.png")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  check_writable(args.out)
  config, params, tokenizer, directory = load_model(
      args.ckpt, args.dtype, args.mesh, ctx=args.ctx, pi_factor=args.pi_factor,
      original_context=args.original_ctx, quantize=args.quantize)
  if Path(args.data).suffix in TOKEN_SUFFIXES:
    tokens = load_tokens(args.data, config.vocab_size)
  else:
    tokens = tokenize_documents(tokenizer, iter_texts(args.data),
                                max_tokens=args.max_tokens)
  print(f"{len(tokens):,} tokens from {args.data}")
  results = []
  for seq_len in args.seq_len:
    n = len(window_starts(len(tokens), seq_len, args.stride, args.mode))
    n = min(n, args.max_windows or n)
    with tqdm(total=n, desc=f"ppl@{seq_len}", unit="window") as bar:
      results.append(evaluate(
          config, params, tokens, seq_len, stride=args.stride, mode=args.mode,
          batch_size=args.batch_size, attention=args.attention,
          max_windows=args.max_windows, progress=bar.update))
  print(f"\nperplexity ({args.mode}): {directory} (RoPE factor "
        f"{config.rope_factor:g})")
  print(f"{'seq_len':>8}  {'windows':>7}  {'ppl':>9}")
  for r in results:
    print(f"{r['seq_len']:>8}  {r['windows']:>7}  {r['perplexity']:>9.3f}")
  write_json(args.out / "perplexity.json",
             {"checkpoint": str(directory), "data": str(args.data),
              "rope_factor": config.rope_factor, "results": results})
  save_plot(args.out / "perplexity.png", [r["seq_len"] for r in results],
            [r["perplexity"] for r in results],
            xlabel="evaluation context (tokens)", ylabel="perplexity",
            title=f"Perplexity: {Path(directory).name}", logy=True)
  print(f"wrote {args.out / 'perplexity.json'} and {args.out / 'perplexity.png'}")


if __name__ == "__main__":
  cli.run(main)
