"""A whole run, as `train.extend` and `train.sft` start it: the spec from the
options (or the saved run on `--resume`), the base checkpoint, the data
feed, the sharded step and the loop, then the exports."""

import contextlib
import dataclasses
import functools
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from longlora_jax.demo import base as demo
from longlora_jax.demo import report as demo_report
from longlora_jax.model import lora
from longlora_jax.data import sft
from longlora_jax.data.text import (Position, batches, document_tokens, packed_rows,
                               prefetch)
from longlora_jax.parallel.distributed import initialize_from_env
from longlora_jax.core.errors import LongLoraError
from longlora_jax.core import lock
from longlora_jax.checkpoints.checkpoint import Checkpoint, param_shardings
from longlora_jax.core.files import (check_writable, free_bytes, human_bytes,
                                   write_json)
from longlora_jax.core.lock import LOCK_FILE
from longlora_jax.model.llama import init_params
from longlora_jax.parallel.sharding import batch_parallelism, make_mesh
from longlora_jax.training import saving
from longlora_jax.training.export import print_commands, write_outputs
from longlora_jax.training.loop import (METRICS_FILE, loop, plot_loss,
                                        truncate_metrics)
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


# What a run writes into its directory; anything else there is the user's.
_OWN = (RUN_FILE, METRICS_FILE, "checkpoints", saving.UNREADABLE,
        "tensorboard", "loss.png", "hf", "peft", "report.json", LOCK_FILE)


def _entries(run_dir: Path) -> list[Path]:
  """What `run_dir` holds besides its lock."""
  return [p for p in run_dir.iterdir() if p.name != LOCK_FILE] \
      if run_dir.is_dir() else []


def _unstarted(run_dir: Path) -> bool:
  """A run directory with nothing to resume: only what a run writes (and
  hidden partial exports), no complete checkpoint and none set aside."""
  return all((p.name in _OWN and p.name != saving.UNREADABLE)
             or p.name.startswith(".") for p in _entries(run_dir)
             ) and not saving.steps_in(run_dir / "checkpoints")


def prepare(given: dict, *, task: str, resume: bool, run_dir: Path,
            replaceable: bool = False) -> tuple[RunSpec, Checkpoint]:
  """(spec, base checkpoint) of the run in `run_dir`, checked before any
  expensive work: a new run from the `given` options, or the saved one
  continued (`resume`). A new run needs an empty `run_dir`, one that a run
  left before its first checkpoint (started afresh, with a note), or one
  holding a previous run when `replaceable` (the demo's default directory)."""
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
    previous = replaceable and (run_dir / RUN_FILE).exists()
    if _entries(run_dir) and not previous:
      if not _unstarted(run_dir):
        raise LongLoraError(
            f"{run_dir} is not empty; continue its run with --resume, or "
            "choose another --out")
      print(f"note: {run_dir} holds a run that stopped before its first "
            "checkpoint (nothing to resume); starting afresh")
  check_ctx(spec, base.config)
  check_attention(spec, base.config)
  check_counts(spec)
  return spec, base


def _check_space(spec: RunSpec, base: Checkpoint, run_dir: Path,
                 mesh) -> None:
  """Refuses a run whose --out cannot hold two of its checkpoints (a new one
  is written before the oldest kept one goes), from the shapes alone."""
  params = jax.eval_shape(functools.partial(
      init_params, base.config, dtype=jnp.dtype(spec.recipe.dtype)),
      jax.random.key(0))
  need = saving.checkpoint_bytes(jax.eval_shape(
      lambda p: initial_run_state(spec, p, mesh), params))
  free = free_bytes(run_dir)
  if free < 2 * need:
    raise LongLoraError(
        f"{run_dir}: {human_bytes(free)} free, but a checkpoint of this run "
        f"takes about {human_bytes(need)} and a run holds two while it "
        "saves; free space there or write elsewhere (another --out)")


def _resume_point(spec: RunSpec, run_dir: Path) -> tuple[int | None, dict]:
  """(the newest checkpoint that reads completely, {newer unreadable step:
  why}); a --steps below it is refused."""
  step0, bad = saving.newest_readable(run_dir / "checkpoints")
  if step0 is not None and spec.recipe.steps < step0:
    raise LongLoraError(
        f"--steps {spec.recipe.steps} is below step {step0}, where this run "
        f"is (its newest checkpoint); pass --steps {step0} or more, or export "
        f"an earlier checkpoint with python -m train.export --run {run_dir} "
        "--step N")
  return step0, bad


def _data(spec: RunSpec, base: Checkpoint, start: Position, shape):
  """Prefetched (batch of [*shape, ctx] arrays, position after it) pairs."""
  if spec.task == "sft":
    rows = _sft_rows(spec, base, start)
  else:
    docs = document_tokens(spec.data, base.tokenizer, eos_id=base.eos_id,
                           text_field=spec.text_field,
                           vocab_size=base.config.vocab_size)
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


@dataclasses.dataclass
class _Job:
  """A run ready to train: checked, loaded and compiled; nothing written."""
  spec: RunSpec
  base: Checkpoint
  config: object
  mesh: object
  run_dir: Path
  resume: bool
  step0: int | None
  unreadable: dict
  data: object
  first: tuple
  state: object
  step_fn: object
  b_shard: object
  compile_s: float


def _setup(given: dict, task: str, resume: bool, run_dir: Path,
           replaceable: bool) -> _Job:
  spec, base = prepare(given, task=task, resume=resume, run_dir=run_dir,
                       replaceable=replaceable)
  mesh = make_mesh(spec.mesh)
  _check_space(spec, base, run_dir, mesh)
  step0, bad = _resume_point(spec, run_dir) if resume else (None, {})
  config = target_config(spec, base.config)
  rows = spec.batch * batch_parallelism(mesh)
  record = {} if step0 is None else saving.read_record(
      saving.manager(run_dir / "checkpoints", read_only=True), step0)
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
  except BaseException:
    data.close()
    raise
  return _Job(spec, base, config, mesh, run_dir, resume, step0, bad, data,
              first, state, step_fn, b_shard, time.time() - tick)


def _tidy(job: _Job) -> None:
  """Before the first write: a new run clears what a previous one left (the
  demo's, or one that never saved); a resumed one sets unreadable
  checkpoints aside and removes unfinished exports."""
  run_dir = job.run_dir
  if not job.resume:
    for p in _entries(run_dir):
      shutil.rmtree(p) if p.is_dir() else p.unlink()
    return
  if job.unreadable:
    bad = saving.describe_unreadable(run_dir / "checkpoints", job.unreadable)
    aside = saving.set_aside(run_dir / "checkpoints", job.unreadable)
    print(f"warning: {bad}; moved to {aside}; resuming from "
          + (f"step {job.step0}" if job.step0 is not None else "the start"),
          file=sys.stderr)
  for p in [*run_dir.glob(".*.partial-*"), *run_dir.glob(".*.old-*")]:
    shutil.rmtree(p, ignore_errors=True)
    print(f"note: removed {p.name}, an export an interrupted run left "
          "unfinished")


def _train(job: _Job) -> int:
  spec, run_dir, config, mesh = job.spec, job.run_dir, job.config, job.mesh
  main_process = jax.process_index() == 0
  if main_process:
    _tidy(job)
  mngr_dir = run_dir / "checkpoints"
  writer = saving.Writer(saving.manager(mngr_dir, keep=spec.keep), job.step0)
  failed = True
  try:
    state = job.state
    if job.step0 is not None:
      state, _ = saving.restore(writer.mngr, job.step0, state)
    if main_process:
      write_spec(run_dir, spec)
      truncate_metrics(run_dir, int(state.step))
    rows = spec.batch * batch_parallelism(mesh)
    attention = ("S²-Attn" if spec.recipe.attention.kind == "s2"
                 else "full attention")
    offloaded = ("activations offloaded to host, "
                 if spec.recipe.offload == "activations" else "")
    print(f"{spec.ckpt}: context {job.base.config.context} -> {spec.ctx} "
          f"(RoPE {config.rope_type} x{config.rope_factor:g}), {spec.mode}, "
          f"{attention}, {offloaded}"
          f"{lora.count_params(state.trainable) / 1e6:.2f}M trainable "
          f"parameters; {rows * spec.recipe.accum} x {spec.ctx} tokens per "
          f"step on {mesh.size} device(s), compiled in {job.compile_s:.1f} s; "
          f"run directory {run_dir}")
    state, signum = loop(spec, config, mesh, state, job.step_fn, job.b_shard,
                         job.first, job.data, writer, run_dir)
    failed = False
  finally:
    try:
      writer.close(failed=failed)  # Reports a last save that failed.
    finally:
      job.data.close()
  if main_process:
    plot_loss(run_dir, spec)
  if signum is not None:
    print(f"\n{signal.Signals(signum).name}: stopped after step "
          f"{int(state.step)}; saved checkpoint {mngr_dir / str(int(state.step))}"
          f"\nresume with: python -m train.{spec.task} --resume --out {run_dir}")
    return 128 + signum

  targets = {"hf": run_dir / "hf"}
  if spec.mode != "full":
    targets["peft"] = run_dir / "peft"
  written = write_outputs(spec, job.base, config, params_of(state), targets)
  print_commands(spec, job.base, config, written)
  if spec.ckpt == "demo" and spec.task == "extend" and "hf" in written:
    report = demo_report.report(spec.ctx, written["hf"])
    write_json(run_dir / "report.json", report)
    print(f"\n{demo_report.format_report(report)}\nwrote {run_dir / 'report.json'}")
  return 0


def run(given: dict, *, task: str, resume: bool = False,
        out: Path | None = None) -> int:
  """The command: trains, exports and prints the evaluation commands;
  returns the exit code (128 + signal when interrupted).

  The run directory is checked writable first and locked against a second
  run; a new run that fails before its first checkpoint leaves nothing.
  """
  initialize_from_env()
  run_dir = run_directory(given, task, out)
  check_writable(run_dir)
  existed = run_dir.exists()
  main_process = jax.process_index() == 0
  with lock.hold(run_dir) if main_process else contextlib.nullcontext():
    try:
      job = _setup(given, task, resume, run_dir, replaceable=(
          task == "extend" and out is None
          and given.get("ckpt") in (None, "demo")))
    except BaseException:
      if main_process and not existed:
        shutil.rmtree(run_dir, ignore_errors=True)
      raise
    try:
      return _train(job)
    except BaseException:
      if main_process and not resume and not saving.steps_in(
          run_dir / "checkpoints"):
        for p in _entries(run_dir) if existed else [run_dir]:
          shutil.rmtree(p) if p.is_dir() else p.unlink()
      raise
