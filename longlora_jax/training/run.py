"""A whole run, as `train.extend` and `train.sft` start it: the spec from the
options (or the saved run on `--resume`), the base checkpoint, the data
feed, the sharded step and the loop, then the exports. What to do with
them next is the commands' to say (`Outcome`)."""

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

from longlora_jax.model import lora
from longlora_jax.model.config import LlamaConfig
from longlora_jax.data.text import Position, batches, prefetch
from longlora_jax.parallel.distributed import initialize_from_env
from longlora_jax.core.errors import LongLoraError
from longlora_jax.core import lock
from longlora_jax.checkpoints.checkpoint import Checkpoint, param_shardings
from longlora_jax.checkpoints.gguf import QTYPES, check_gguf
from longlora_jax.core.files import (check_writable, free_bytes, human_bytes,
                                     reclaim_all_unfinished)
from longlora_jax.core.lock import LOCK_FILE
from longlora_jax.model.llama import init_params
from longlora_jax.parallel.sharding import batch_parallelism, make_mesh
from longlora_jax.training import saving
from longlora_jax.training.export import describe, gguf_name, write_outputs
from longlora_jax.training.loop import (METRICS_FILE, loop, plot_loss,
                                        truncate_metrics)
from longlora_jax.training.options import (RESUMABLE, CheckpointDefaults,
                                           make_spec, options_of)
from longlora_jax.training.recipe import (RUN_FILE, RunSpec, check_attention,
                                          check_counts, check_ctx, read_spec,
                                          target_config, write_spec)
from longlora_jax.training.tasks import Task
from longlora_jax.training.step import (initial_run_state, jit_train_step,
                                        params_of)


@dataclasses.dataclass(frozen=True)
class Outcome:
  """How a run ended, for its command to report: `code` the exit code
  (128 + the signal that stopped it), `written` the exports ("hf", "peft"
  -> directory; none when stopped, and none on processes but the first),
  `config` the trained model's (its RoPE scaling), `defaults` the
  checkpoint defaults that applied to the run (None where none did)."""
  code: int
  spec: RunSpec
  base: Checkpoint
  config: LlamaConfig
  run_dir: Path
  written: dict[str, Path]
  defaults: CheckpointDefaults | None


def _defaults_of(ckpt: str, defaults: CheckpointDefaults | None
                 ) -> CheckpointDefaults | None:
  """`defaults` where they are checkpoint `ckpt`'s, else None."""
  return defaults if defaults and defaults.ckpt == ckpt else None


def _ckpt(given: dict, task: Task,
          defaults: CheckpointDefaults | None) -> str:
  """The checkpoint a new run starts from: --ckpt, else the defaults'."""
  ckpt = given.get("ckpt") or (defaults.ckpt if defaults else None)
  if ckpt is None:
    raise LongLoraError(f"--ckpt is required: {task.needs['ckpt']}")
  return ckpt


def run_directory(given: dict, task: Task, out: Path | None,
                  defaults: CheckpointDefaults | None = None) -> Path:
  """--out, else the checkpoint defaults' directory, else
  runs/TASK/NAME-CTX."""
  if out is not None:
    return out
  ckpt = _ckpt(given, task, defaults)
  if own := _defaults_of(ckpt, defaults):
    return own.out
  name = ckpt.rstrip("/").split("/")[-1].split("@")[0]
  return Path("runs") / task.name / f"{name}-{given.get('ctx')}"


def _new_spec(given: dict, task: Task, base: Checkpoint,
              defaults: CheckpointDefaults | None) -> RunSpec:
  own = _defaults_of(base.name, defaults)
  options = {**(own.options if own else {}), **given, "ckpt": base.name}
  if own and own.data and "data" not in given:
    options["data"] = own.data()
  if "ctx" not in options:
    raise LongLoraError("--ctx is required: " + task.needs["ctx"].format(
        ctx=4 * base.config.context))
  if base.quantized:  # a bitsandbytes 4-bit checkpoint trains in 4 bits
    options = {**options, "quantize": base.quantized}
  return make_spec(options, task=task, base_config=base.config.to_hf_dict())


def _resumed_spec(given: dict, task: Task, saved: RunSpec, run_dir: Path,
                  base: Checkpoint) -> RunSpec:
  """The saved spec with the options a resumed run may change; a different
  model, context or recipe is refused."""
  if task is not saved.task:
    name = saved.task.name
    raise LongLoraError(
        f"{run_dir} is a run of train.{name}; resume it with "
        f"python -m train.{name} --resume --out {run_dir}")
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
        "tensorboard", "loss.png", "hf", "peft", "report.json", LOCK_FILE,
        *map(gguf_name, QTYPES))


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


def prepare(given: dict, *, task: Task, resume: bool, run_dir: Path,
            defaults: CheckpointDefaults | None = None,
            replaceable: bool = False) -> tuple[RunSpec, Checkpoint]:
  """(spec, base checkpoint) of the run in `run_dir`, checked before any
  expensive work: a new run from the `given` options (and `defaults`, where
  they are its checkpoint's), or the saved one continued (`resume`). A new
  run needs an empty `run_dir`, one that a run left before its first
  checkpoint (started afresh, with a note), or one holding a previous run
  when `replaceable` (the checkpoint defaults' directory)."""
  if resume:
    saved = read_spec(run_dir)
    base = Checkpoint.open(saved.ckpt, saved.original_ctx)
    spec = _resumed_spec(given, task, saved, run_dir, base)
  else:
    base = Checkpoint.open(_ckpt(given, task, defaults),
                           given.get("original_ctx"))
    if "original_ctx" in given and base.note is None:
      raise LongLoraError(
          f"--original-ctx is for a checkpoint in Meta's layout; {base.name} "
          "has a config.json, whose max_position_embeddings is its context: "
          "drop --original-ctx")
    spec = _new_spec({k: v for k, v in given.items() if k != "ckpt"}, task,
                     base, defaults)
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
  if spec.gguf:
    check_gguf(target_config(spec, base.config), spec.gguf)
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
  """Prefetched (batch of [*shape, ctx] arrays, position after it) pairs of
  the task's rows."""
  return prefetch(batches(spec.task.rows(spec, base, start), shape))


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


def _setup(given: dict, task: Task, resume: bool, run_dir: Path,
           defaults: CheckpointDefaults | None, replaceable: bool) -> _Job:
  spec, base = prepare(given, task=task, resume=resume, run_dir=run_dir,
                       defaults=defaults, replaceable=replaceable)
  spec.task.check_data(spec)  # before any weight is read or compiled
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
        spec.recipe.dtype, param_shardings(base.config, mesh),
        spec.quantize), mesh)
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
  """Before the first write: a new run clears what a previous one left (in
  the checkpoint defaults' directory, or one that never saved); a resumed
  one sets unreadable checkpoints aside and removes unfinished exports."""
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
  # The run's lock is held: whatever an export left unfinished is gone.
  reclaim_all_unfinished(run_dir, owned=True)


def _train(job: _Job) -> tuple[int, dict[str, Path]]:
  """Trains and exports: (exit code, what was written, as `describe`
  says)."""
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
    offloaded = (f"{spec.recipe.offload.replace(',', ' and ')} offloaded "
                 "to host, " if spec.recipe.offload != "none" else "")
    if job.base.note:
      print(f"note: {job.base.note}")
    print(f"{spec.ckpt}: context {job.base.config.context} -> {spec.ctx} "
          f"(RoPE {config.rope_type} factor {config.rope_factor:g}), "
          f"{spec.mode}, "
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
          f"{int(state.step)}; saved checkpoint "
          f"{mngr_dir / str(int(state.step))}"
          f"\nresume with: python -m train.{spec.task.name} --resume --out "
          f"{run_dir}")
    return 128 + signum, {}

  targets = {"hf": run_dir / "hf"}
  if spec.mode != "full":
    targets["peft"] = run_dir / "peft"
  if spec.gguf:
    targets["gguf"] = run_dir / gguf_name(spec.gguf)
  written = write_outputs(spec, job.base, config, params_of(state), targets)
  if written:
    print(f"\n{describe(written, config, spec)}")
  return 0, written


def run(given: dict, *, task: Task,
        defaults: CheckpointDefaults | None = None, resume: bool = False,
        out: Path | None = None) -> Outcome:
  """The command's run of `task`: trains, exports and says where the
  exports are (`defaults`: those of the checkpoint a run takes when given
  no --ckpt).

  The run directory is checked writable first and locked against a second
  run; a new run that fails before its first checkpoint leaves nothing.
  """
  initialize_from_env()
  if resume and out is None and "ckpt" not in given and defaults is None:
    raise LongLoraError("--resume continues the run in --out: name its "
                        "directory")
  run_dir = run_directory(given, task, out, defaults)
  check_writable(run_dir)
  existed = run_dir.exists()
  main_process = jax.process_index() == 0
  with lock.hold(run_dir) if main_process else contextlib.nullcontext():
    try:
      job = _setup(given, task, resume, run_dir, defaults, replaceable=(
          out is None and defaults is not None and run_dir == defaults.out))
    except BaseException:
      if main_process and not existed:
        shutil.rmtree(run_dir, ignore_errors=True)
      raise
    try:
      code, written = _train(job)
    except BaseException:
      if main_process and not resume and not saving.steps_in(
          run_dir / "checkpoints"):
        for p in _entries(run_dir) if existed else [run_dir]:
          shutil.rmtree(p) if p.is_dir() else p.unlink()
      raise
  return Outcome(code, job.spec, job.base, job.config, run_dir, written,
                 _defaults_of(job.spec.ckpt, defaults))
