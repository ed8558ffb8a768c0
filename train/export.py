"""Export a saved checkpoint of a `train.extend` or `train.sft` run as a HF model or adapter.

  python -m train.export --run runs/demo/extend --out runs/demo/step100
  python -m train.export --run DIR --step 200 --out DIR2 --format peft

`hf` writes the merged model (safetensors, config with the RoPE scaling,
tokenizer); `peft` the LoRA adapter with the trained embedding and norms.
"""

from pathlib import Path

from longlora_jax.core import cli
from longlora_jax.core.errors import LongLoraError
from longlora_jax.core.files import check_writable
from longlora_jax.demo import stdlib
from longlora_jax.evaluation import suggest
from longlora_jax.training.export import describe, load_run, write_outputs


def parse_args(argv=None):
  p = cli.Parser(__doc__)
  p.add_argument("--run", type=Path, required=True,
                 help="run directory of python -m train.extend or train.sft")
  p.add_argument("--step", type=cli.index,
                 help="checkpoint step (default: the newest that reads "
                      "completely)")
  p.add_argument("--out", type=Path, required=True,
                 help="the model (or adapter) directory to write")
  p.add_argument("--format", choices=("hf", "peft"), default="hf",
                 help="hf: merged model; peft: LoRA adapter + embed/norms")
  cli.option(p, "--mesh", default=None,
             purpose="sharding the run's weights while exporting "
                     "(default: the run's own --mesh)")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
    raise LongLoraError(f"--out {args.out} exists and is not empty; choose "
                        "another directory")
  check_writable(args.out)
  spec, base, config, params, step = load_run(args.run, args.step, args.mesh)
  written = write_outputs(spec, base, config, params, {args.format: args.out},
                          overwrite=False)
  print(f"{args.run}: step {step} exported")
  print(f"\n{describe(written, config)}")
  if "hf" in written:
    print("\n" + suggest.commands(
        spec.task.makes, written["hf"], tokenizer=base.tokenizer,
        data=stdlib.evaluation_data(spec.data),
        native=config.original_context, ctx=spec.ctx))


if __name__ == "__main__":
  cli.run(main)
