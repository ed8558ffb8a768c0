"""Export a saved checkpoint of a `train.extend` or `train.sft` run as a HF model or adapter.

  python -m train.export --run runs/demo/extend --out runs/demo/step100
  python -m train.export --run DIR --step 200 --out DIR2 --format peft

`hf` writes the merged model (safetensors, config with the RoPE scaling,
tokenizer); `peft` the LoRA adapter with the trained embedding and norms.
"""

import argparse
from pathlib import Path

from longlora_jax import checkpoint, cli
from longlora_jax.errors import CheckpointError, LongLoraError
from longlora_jax.hf_io import load_hf
from longlora_jax.train_step import params_of
from train.extend import (base_directory, initial_state, print_commands,
                          read_spec, target_config, train_config,
                          write_outputs)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--run", type=Path, required=True,
                 help="run directory of python -m train.extend or train.sft")
  p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
  p.add_argument("--out", type=Path, required=True,
                 help="the model (or adapter) directory to write")
  p.add_argument("--format", choices=("hf", "peft"), default="hf",
                 help="hf: merged model; peft: LoRA adapter + embed/norms")
  return p.parse_args(argv)


def load_run(run_dir: Path, step: int | None = None):
  """(spec, extended config, params with LoRA nodes, step) of a checkpoint."""
  spec = read_spec(run_dir)
  directory = run_dir / "checkpoints"
  mngr = checkpoint.manager(directory, read_only=True) if directory.exists() \
      else None
  steps = sorted(mngr.all_steps()) if mngr else []
  if not steps:
    raise LongLoraError(f"{run_dir}: no checkpoints saved yet")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise LongLoraError(f"{run_dir}: no checkpoint of step {step}; saved: "
                        f"{', '.join(map(str, steps))}")
  base = base_directory(spec.ckpt)
  config, params = load_hf(base, dtype=spec.dtype)
  if config.to_hf_dict() != spec.base_config:
    raise CheckpointError(f"{spec.ckpt} is no longer the model {run_dir} was "
                          "trained from (its config.json differs)")
  state = initial_state(spec, params, train_config(spec))
  state, _ = checkpoint.restore(mngr, step, state)
  mngr.close()
  return spec, target_config(spec, config), params_of(state), step


def main(argv=None):
  args = parse_args(argv)
  if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
    raise LongLoraError(f"--out {args.out} exists and is not empty; choose "
                        "another directory")
  spec, config, params, step = load_run(args.run, args.step)
  written = write_outputs(spec, config, params, {args.format: args.out},
                          overwrite=False)
  print(f"{args.run}: step {step} exported")
  print_commands(spec, config, written)


if __name__ == "__main__":
  cli.run(main)
