"""Passkey retrieval accuracy against prompt length (the official protocol).

  python -m eval.passkey --ckpt DIR --ctx 32768 --max-tokens 32000

Prompts are --interval, 2 x --interval, ... tokens long, up to --max-tokens.
`--protocol official` (the default for Llama's SentencePiece tokenizer)
sizes their filler as the official script does, in characters for Llama's
tokenizer; `measured` (the default for any other tokenizer) measures it with
the checkpoint's tokenizer, so that prompts have the lengths asked for.
"""

from pathlib import Path

from tqdm.auto import tqdm

from longlora_jax.checkpoints.checkpoint import load_model
from longlora_jax.core import cli
from longlora_jax.core.errors import LongLoraError
from longlora_jax.core.files import check_writable, write_json
from longlora_jax.evaluation.passkey import default_protocol, filler_lengths, retrieval
from longlora_jax.core.plots import save_plot


def parse_args(argv=None):
  p = cli.Parser(__doc__)
  cli.model_options(p)
  p.add_argument("--max-tokens", type=cli.integer(1, tokens=True),
                 default=32000,
                 help="longest prompt, in tokens (100k = 102400, or the "
                      "trained length, e.g. 100000)")
  p.add_argument("--interval", type=cli.integer(1, tokens=True), default=1000,
                 help="prompt length step, in tokens")
  p.add_argument("--protocol", choices=("official", "measured"),
                 help="filler lengths: the official script's (default for "
                      "Llama's tokenizer) or measured with the checkpoint's "
                      "tokenizer (default otherwise)")
  p.add_argument("--num-tests", type=cli.count, default=10,
                 help="trials per length")
  p.add_argument("--chunk-size", type=cli.count, default=2048,
                 help="prefill tokens per step")
  p.add_argument("--out", type=Path, default=Path("runs/passkey"),
                 help="directory for passkey.json and passkey.png")
  return p.parse_args(argv)


def run(config, params, tokenizer, *, max_tokens, interval, num_tests,
        protocol, chunk_size=2048, show_progress=True):
  """[{tokens, filler_chars, accuracy, correct, trials}] per prompt length;
  `protocol` "official" or "measured"."""
  if max_tokens < interval:
    raise LongLoraError(f"--max-tokens {max_tokens} < --interval {interval}: "
                        "nothing to evaluate")
  try:
    lengths = filler_lengths(max_tokens, interval, None if protocol == (
        "official") else tokenizer)
  except LongLoraError as e:
    raise LongLoraError(f"--interval {interval}: {e}") from None
  if lengths[0] < 1:
    raise LongLoraError(f"--interval {interval} gives prompts without filler "
                        "(the protocol rounds to 1024 characters); use 274 or more")
  rows = []
  bar = tqdm(total=len(lengths) * num_tests, desc="passkey", unit="trial",
             disable=not show_progress)
  for n_filler in lengths:
    correct, tokens = retrieval(config, params, tokenizer, n_filler,
                                num_tests, chunk_size=chunk_size,
                                on_trial=bar.update)
    rows.append({"tokens": tokens, "filler_chars": n_filler,
                 "accuracy": correct / num_tests, "correct": correct,
                 "trials": num_tests})
    bar.set_postfix(tokens=rows[-1]["tokens"], acc=rows[-1]["accuracy"])
  bar.close()
  return rows


def main(argv=None):
  args = parse_args(argv)
  check_writable(args.out)
  config, params, tokenizer, directory = load_model(
      args.ckpt, args.dtype, args.mesh, ctx=args.ctx, pi_factor=args.pi_factor,
      original_context=args.original_ctx, quantize=args.quantize)
  protocol = args.protocol or default_protocol(tokenizer)
  rows = run(config, params, tokenizer, max_tokens=args.max_tokens,
             interval=args.interval, num_tests=args.num_tests,
             chunk_size=args.chunk_size, protocol=protocol)
  print(f"\npasskey retrieval: {directory} (RoPE factor {config.rope_factor:g}"
        f", {protocol} lengths)")
  print(f"{'tokens':>8}  {'accuracy':>8}")
  for r in rows:
    print(f"{r['tokens']:>8}  {r['accuracy']:>8.2f}")
  write_json(args.out / "passkey.json",
             {"checkpoint": str(directory), "rope_factor": config.rope_factor,
              "protocol": protocol, "results": rows})
  save_plot(args.out / "passkey.png", [r["tokens"] for r in rows],
            [r["accuracy"] for r in rows], xlabel="prompt length (tokens)",
            ylabel="accuracy", title=f"Passkey retrieval: {Path(directory).name}")
  print(f"wrote {args.out / 'passkey.json'} and {args.out / 'passkey.png'}")


if __name__ == "__main__":
  cli.run(main)
