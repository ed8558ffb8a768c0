"""Supervised fine-tuning on long instructions (LongAlpaca) with LongLoRA.

  python -m train.sft --ckpt runs/demo/extend/hf --data my_records.jsonl --ctx 1024
  python -m train.sft --ckpt Llama-2-13b-longlora-32k --ctx 32768 --data Yukang/LongAlpaca-12k

Records are {"instruction", "output"} with an optional "input", prompted as
the official LongLoRA fine-tuning does ("[INST]{instruction}[/INST]", or the
Llama-2 system form with an input); the loss falls on `output + eos` only,
and examples longer than --ctx are truncated (and counted). Examples are
packed several to a row of --ctx tokens with segment ids, so attention,
S²-Attn included, never crosses examples and no row is padding to the
longest. Everything else (LoRA+/--full-ft, mesh, checkpoints, --resume,
progress, HF, PEFT and GGUF export, `python -m train.export`) is
train.extend's.
"""

from longlora_jax.core import cli
from longlora_jax.evaluation import suggest
from longlora_jax.training import options, run
from longlora_jax.training.tasks import SFT


def main(argv=None) -> int:
  args = options.parser(SFT, __doc__).parse_args(argv)
  done = run.run(options.given(args), task=SFT, resume=args.resume,
                 out=args.out)
  if "hf" in done.written:
    print("\n" + suggest.commands(
        SFT.makes, done.written["hf"], tokenizer=done.base.tokenizer,
        data=done.spec.data, native=done.config.original_context,
        ctx=done.spec.ctx))
  return done.code


if __name__ == "__main__":
  cli.run(main)
