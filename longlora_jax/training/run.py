"""A whole run, as `train.extend` and `train.sft` start it: the spec from the
options (or the saved run on `--resume`), the base checkpoint, the data
feed, the sharded step and the loop, then the exports."""

import shutil
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from longlora_jax import demo, demo_report, lora, sft
from longlora_jax.data import (Position, batches, document_tokens, packed_rows,
                               prefetch)
from longlora_jax.distributed import initialize_from_env
from longlora_jax.errors import LongLoraError
from longlora_jax.io.checkpoint import Checkpoint, param_shardings
from longlora_jax.io.files import write_json
from longlora_jax.sharding import batch_parallelism, make_mesh
from longlora_jax.training import saving
from longlora_jax.training.export import print_commands, write_outputs
from longlora_jax.training.loop import loop, plot_loss, truncate_metrics
from longlora_jax.training.options import (DEMO, RESUMABLE, make_spec,
                                           options_of)
from longlora_jax.training.recipe import (LONGALPACA, RUN_FILE, RunSpec,
                                          check_attention, check_counts,
                                          check_ctx, read_spec, target_config,
                                          write_spec)
from longlora_jax.training.step import (initial_run_state, jit_train_step,
                                        params_of)


def run_directory(given: dict, task: str, out: Path | None) -> Path:
  """--out, else the demo's runs/demo/extend, else runs/TASK/NAME-CTX."""
  if out is not None:
    return out
  ckpt = given.get("ckpt")
  if ckpt in (None, "demo"):
    return Path("runs") / "demo" / task
  name = ckpt.rstrip("/").split("/")[-1].split("@")[0]
  return Path("runs") / task / f"{name}-{given.get('ctx')}"


def _new_spec(given: dict, task: str, base: Checkpoint) -> RunSpec:
  demo_run = base.name == "demo" and task == "extend"
  options = {**(DEMO if demo_run else {}),
             **({"data": LONGALPACA} if task == "sft" else {}), **given,
             "ckpt": base.name}
  if demo_run and "data" not in given:
    options["data"] = str(demo.demo_data()[0])
  if "ctx" not in options:
    raise LongLoraError(
        "--ctx is required: " + ("the context to extend to, e.g. --ctx "
                                 f"{4 * base.config.context}"
                                 if task == "extend" else
                                 "the tokens per training row"))
  return make_spec(options, task=task, base_config=base.config.to_hf_dict())


def _resumed_spec(given: dict, task: str, saved: RunSpec, run_dir: Path,
                  base: Checkpoint) -> RunSpec:
  """The saved spec with the options a resumed run may change; a different
  model, context or recipe is refused."""
  if task != saved.task:
    raise LongLoraError(
        f"{run_dir} is a run of train.{saved.task}; resume it with "
        f"python -m train.{saved.task} --resume --out {run_dir}")
  if given.get("ckpt", saved.ckpt) != saved.ckpt:
    raise LongLoraError(
        f"{run_dir} is a run of --ckpt {saved.ckpt}, not of {given['ckpt']}; "
        "resume it with that checkpoint, or start a new run with another "
        "--out")
  if base.config.to_hf_dict() != saved.base_config:
    raise LongLoraError(
        f"{run_dir} was started from another model than the one {saved.ckpt} "
        "holds now (its config.json differs); resume it with the original "
        "checkpoint")
  if given.get("ctx", saved.ctx) != saved.ctx:
    raise LongLoraError(
        f"{run_dir} extends to --ctx {saved.ctx}, not {given['ctx']}; resume "
        "it with that context, or start a new run with another --out")
  options = options_of(saved)
  for name, value in given.items():
    if name not in RESUMABLE and value != options[name]:
      raise LongLoraError(
          f"--{name.replace('_', '-')} {value} differs from this run's "
          f"{options[name]}; a resumed run keeps its recipe (only "
          f"{', '.join('--' + n.replace('_', '-') for n in RESUMABLE)} can "
          "change)")
  return make_spec({**options, **{k: v for k, v in given.items()
                                  if k in RESUMABLE}},
                   task=task, base_config=saved.base_config)


def prepare(given: dict, *, task: str, resume: bool, run_dir: Path,
            replaceable: bool = False) -> tuple[RunSpec, Checkpoint]:
  """(spec, base checkpoint) of the run in `run_dir`, checked before any
  expensive work: a new run from the `given` options, or the saved one
  continued (`resume`). A new run needs an empty `run_dir`, or one holding
  a previous run when `replaceable` (the demo's default directory)."""
  if resume:
    saved = read_spec(run_dir)
    base = Checkpoint.open(saved.ckpt)
    spec = _resumed_spec(given, task, saved, run_dir, base)
  else:
    if task == "sft" and given.get("ckpt") is None:
      raise LongLoraError("--ckpt is required: the model to fine-tune, e.g. "
                          "the merged model of a train.extend run "
                          "(runs/demo/extend/hf)")
    base = Checkpoint.open(given.get("ckpt") or "demo")
    spec = _new_spec({k: v for k, v in given.items() if k != "ckpt"}, task,
                     base)
    if run_dir.exists() and any(run_dir.iterdir()) and not (
        replaceable and (run_dir / RUN_FILE).exists()):
      raise LongLoraError(
          f"{run_dir} is not empty; continue its run with --resume, or "
          "choose another --out")
  check_ctx(spec, base.config)
  check_attention(spec, base.config)
  check_counts(spec)
  return spec, base


def _data(spec: RunSpec, base: Checkpoint, start: Position, shape):
  """Prefetched (batch of [*shape, ctx] arrays, position after it) pairs."""
  if spec.task == "sft":
    rows = _sft_rows(spec, base, start)
  else:
    docs = document_tokens(spec.data, base.tokenizer, eos_id=base.eos_id,
                           text_field=spec.text_field)
    rows = (({"input_ids": row}, position) for row, position in packed_rows(
        docs, spec.ctx, seed=spec.seed, start=start, source=spec.data))
  return prefetch(batches(rows, shape))


def _sft_rows(spec: RunSpec, base: Checkpoint, start: Position):
  examples, truncated = sft.load_examples(spec.data, base.tokenizer, spec.ctx)
  if truncated:
    print(f"warning: {truncated} of {len(examples)} examples are longer than "
          f"--ctx {spec.ctx} tokens and were truncated")
  pad_id = base.tokenizer.pad_token_id
  yield from sft.sft_rows(examples, spec.ctx,
                          base.eos_id if pad_id is None else pad_id,
                          seed=spec.seed, start=start)


def run(given: dict, *, task: str, resume: bool = False,
        out: Path | None = None) -> int:
  """The command: trains, exports and prints the evaluation commands;
  returns the exit code (128 + signal when interrupted)."""
  initialize_from_env()
  run_dir = run_directory(given, task, out)
  spec, base = prepare(
      given, task=task, resume=resume, run_dir=run_dir,
      replaceable=(task == "extend" and out is None
                   and given.get("ckpt") in (None, "demo")))
  config = target_config(spec, base.config)
  mesh = make_mesh(spec.mesh)
  rows = spec.batch * batch_parallelism(mesh)
  mngr_dir = run_dir / "checkpoints"
  step0 = (saving.manager(mngr_dir, read_only=True).latest_step()
           if resume and mngr_dir.exists() else None)
  record = {} if step0 is None else saving.read_record(
      saving.manager(mngr_dir, read_only=True), step0)
  data = _data(spec, base, Position(**record.get("data", {})),
               (spec.recipe.accum, rows))
  try:
    first = next(data)  # Bad data fails here, before anything is written.
    # The weights go straight to their shards: no device, and no process,
    # ever holds the whole model.
    state = initial_run_state(spec, base.params(
        spec.recipe.dtype, param_shardings(base.config, mesh)), mesh)
    shape = {k: jax.ShapeDtypeStruct(v.shape, jnp.int32)
             for k, v in first[0].items()}
    step_fn, s_shard, b_shard = jit_train_step(config, spec.recipe, mesh,
                                               state, shape)
    # Compiled before the first step, so that its time and MFU are a step's.
    tick = time.time()
    step_fn = step_fn.lower(state, jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        shape, b_shard)).compile()
    compile_s = time.time() - tick

    if not resume and run_dir.exists():
      shutil.rmtree(run_dir)  # The demo's previous default run: start afresh.
    run_dir.mkdir(parents=True, exist_ok=True)
    mngr = saving.manager(mngr_dir, keep=spec.keep)
    try:
      if step0 is not None:
        state, _ = saving.restore(mngr, step0, state)
      if jax.process_index() == 0:
        write_spec(run_dir, spec)
        truncate_metrics(run_dir, int(state.step))
      attention = ("S²-Attn" if spec.recipe.attention.kind == "s2"
                   else "full attention")
      print(f"{spec.ckpt}: context {base.config.context} -> {spec.ctx} "
            f"(RoPE {config.rope_type} x{config.rope_factor:g}), {spec.mode}, "
            f"{attention}, "
            f"{lora.count_params(state.trainable) / 1e6:.2f}M trainable "
            f"parameters; {rows * spec.recipe.accum} x {spec.ctx} tokens per "
            f"step on {mesh.size} device(s), compiled in {compile_s:.1f} s; "
            f"run directory {run_dir}")
      state, signum = loop(spec, config, mesh, state, step_fn, b_shard,
                           first, data, mngr, step0, run_dir)
    finally:
      mngr.wait_until_finished()
      mngr.close()
  finally:
    data.close()
  if jax.process_index() == 0:
    plot_loss(run_dir, spec)
  if signum is not None:
    print(f"\n{signal.Signals(signum).name}: stopped after step "
          f"{int(state.step)}; saved checkpoint {mngr_dir / str(int(state.step))}"
          f"\nresume with: python -m train.{spec.task} --resume --out {run_dir}")
    return 128 + signum

  targets = {"hf": run_dir / "hf"}
  if spec.mode != "full":
    targets["peft"] = run_dir / "peft"
  written = write_outputs(spec, base, config, params_of(state), targets)
  print_commands(spec, config, written)
  if spec.ckpt == "demo" and spec.task == "extend" and "hf" in written:
    report = demo_report.report(spec.ctx, written["hf"])
    write_json(run_dir / "report.json", report)
    print(f"\n{demo_report.format_report(report)}\nwrote {run_dir / 'report.json'}")
  return 0
