"""Export a saved checkpoint of a `train.extend` or `train.sft` run as a HF model, adapter or GGUF.

  python -m train.export --run runs/demo/extend --out runs/demo/step100
  python -m train.export --run DIR --step 200 --out DIR2 --format peft
  python -m train.export --run DIR --out DIR2 --format gguf --gguf-type q8_0

`hf` writes the merged model (safetensors, config with the RoPE scaling,
tokenizer); `peft` the LoRA adapter with the trained embedding and norms;
`gguf` the merged model as DIR2/model-TYPE.gguf for llama.cpp.
"""

from pathlib import Path

from longlora_jax.core import cli
from longlora_jax.core.errors import LongLoraError
from longlora_jax.core.files import check_writable
from longlora_jax.checkpoints.gguf import QTYPES
from longlora_jax.demo import stdlib
from longlora_jax.evaluation import suggest
from longlora_jax.training.recipe import read_spec
from longlora_jax.training.export import (describe, gguf_name, load_run,
                                          write_outputs)


def parse_args(argv=None):
  p = cli.Parser(__doc__)
  p.add_argument("--run", type=Path, required=True,
                 help="run directory of python -m train.extend or train.sft")
  p.add_argument("--step", type=cli.index,
                 help="checkpoint step (default: the newest that reads "
                      "completely)")
  p.add_argument("--out", type=Path, required=True,
                 help="the model (or adapter) directory to write")
  p.add_argument("--format", choices=("hf", "peft", "gguf"), default="hf",
                 help="hf: merged model; peft: LoRA adapter + embed/norms; "
                      "gguf: merged model for llama.cpp")
  p.add_argument("--gguf-type", choices=tuple(QTYPES),
                 help="--format gguf: the type of its matrices (default: "
                      "the run's --gguf, else f16)")
  cli.option(p, "--mesh", default=None,
             purpose="sharding the run's weights while exporting "
                     "(default: the run's own --mesh)")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.gguf_type and args.format != "gguf":
    raise LongLoraError("--gguf-type sets the type of a GGUF export; add "
                        "--format gguf")
  if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
    raise LongLoraError(f"--out {args.out} exists and is not empty; choose "
                        "another directory")
  check_writable(args.out)
  spec = read_spec(args.run)
  qtype = args.gguf_type or spec.gguf or "f16"
  spec, base, config, params, step = load_run(
      args.run, args.step, args.mesh,
      gguf_type=qtype if args.format == "gguf" else None)
  out = args.out / gguf_name(qtype) if args.format == "gguf" else args.out
  written = write_outputs(spec, base, config, params, {args.format: out},
                          overwrite=False, gguf_type=qtype)
  print(f"{args.run}: step {step} exported")
  print(f"\n{describe(written, config, spec)}")
  if "hf" in written:
    print("\n" + suggest.commands(
        spec.task.makes, written["hf"], tokenizer=base.tokenizer,
        data=stdlib.evaluation_data(spec.data),
        native=config.original_context, ctx=spec.ctx))


if __name__ == "__main__":
  cli.run(main)
