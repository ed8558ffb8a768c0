"""Extend a Llama's context window with LongLoRA (S²-Attn + linear PI + LoRA+).

  python -m train.extend                                  # built-in demo, CPU
  python -m train.extend --ckpt hf:meta-llama/Llama-2-7b-hf --ctx 100000

Trains with shifted sparse attention at the target context, the RoPE
positions interpolated by ceil(ctx / original), and LoRA on the attention
projections plus the embedding and norms; then writes the merged model (HF
format) and the PEFT adapter into the run directory (and, with --gguf f16,
a GGUF for llama.cpp). Meta's original release (params.json and
consolidated.*.pth) works as it is, its original context told from its
files (--original-ctx overrides it). Interrupt it (Ctrl-C, SIGTERM) and
`--resume` continues the same run exactly.

With no arguments it extends the built-in tiny model (native context 256)
to 1024 tokens on the CPU in a few minutes and prints perplexity and
passkey retrieval of the base model, the base model with position
interpolation but no training, and the extended model.
"""

from longlora_jax.core import cli
from longlora_jax.demo import defaults, report, stdlib
from longlora_jax.evaluation import suggest
from longlora_jax.training import options, run
from longlora_jax.training.tasks import EXTEND

DEMO = defaults.EXTEND


def main(argv=None) -> int:
  args = options.parser(EXTEND, __doc__, DEMO).parse_args(argv)
  done = run.run(options.given(args), task=EXTEND, defaults=DEMO,
                 resume=args.resume, out=args.out)
  if "hf" in done.written:
    print("\n" + suggest.commands(
        EXTEND.makes, done.written["hf"], tokenizer=done.base.tokenizer,
        data=stdlib.evaluation_data(done.spec.data),
        native=done.config.original_context, ctx=done.spec.ctx))
    if done.defaults is DEMO:
      print("\n" + report.save_report(done.run_dir, done.spec.ctx,
                                      done.written["hf"]))
  return done.code


if __name__ == "__main__":
  cli.run(main)
