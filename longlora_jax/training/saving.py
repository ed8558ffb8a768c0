"""Orbax checkpoints of a training run: what trains, its optimizer state, the
step, and a JSON record (data position, last loss).

The frozen weights are not saved: they are the base checkpoint's, reloaded
from it, so a LoRA+ checkpoint of a 7B model is a few hundred MB, not 13 GB.
Orbax writes each step to a temporary directory and renames it when
complete, asynchronously after copying the arrays off the device, and keeps
the newest `keep` steps.

What can go wrong is said in one line: a checkpoint damaged after it was
written (`unreadable`, `newest_readable`, `set_aside`), and a save that
fails in the background (`Writer` notices it at the step after). Orbax's
own logging and the tracebacks of reads abandoned after an error are
silenced: they repeat, at length, what that line says.
"""

import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from longlora_jax.core.errors import CheckpointError, LongLoraError
from longlora_jax.core.files import os_cause
from longlora_jax.training.step import TrainState

# Where a run keeps the checkpoints that could not be read.
UNREADABLE = "checkpoints.unreadable"


def _orbax(filename: str) -> bool:
  return f"{os.sep}orbax{os.sep}" in filename


def _not_orbax(record: logging.LogRecord) -> bool:
  """Keeps a log record unless Orbax made it, directly or as asyncio's
  report of one of its abandoned futures."""
  if _orbax(record.pathname):
    return False
  tb = record.exc_info[2] if record.exc_info else None
  while tb is not None:
    if _orbax(tb.tb_frame.f_code.co_filename):
      return False
    tb = tb.tb_next
  return True


def _abandoned_read(unraisable, orbax=f"{os.sep}orbax{os.sep}") -> bool:
  """An error of a read or write that an earlier error of the same restore
  or save abandoned (its event loop closed under it, or its coroutine
  collected unfinished). Builtins only: it also runs at shutdown."""
  code = getattr(unraisable.object, "cr_code", None)
  return "Event loop is closed" in str(unraisable.exc_value) or (
      code is not None and orbax in code.co_filename)


@functools.cache
def _quiet() -> None:
  for logger in ("absl", "asyncio"):
    logging.getLogger(logger).addFilter(_not_orbax)
  sys.unraisablehook = (
      lambda u, previous=sys.unraisablehook, abandoned=_abandoned_read:
      None if abandoned(u) else previous(u))


def manager(directory: str | os.PathLike, *, keep: int | None = None,
            read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` (async saves, newest `keep` kept;
  temporary directories of interrupted saves removed)."""
  _quiet()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=True, read_only=read_only,
      create=not read_only, cleanup_tmp_directories=not read_only)
  # Handlers named up front, so that a new manager (a resumed run, an
  # export) can read an item's metadata before restoring it.
  handlers = {"state": ocp.StandardCheckpointHandler(),
              "record": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers=handlers)


def _saved(state: TrainState) -> dict:
  return {"step": state.step, "trainable": state.trainable,
          "opt_state": state.opt_state}


def save(mngr: ocp.CheckpointManager, state: TrainState, record: dict, *,
         force: bool = False) -> None:
  """Starts saving `state` (at its step) and `record`; returns once the
  arrays are off the device, so the next step may reuse their buffers."""
  step = int(state.step)
  mngr.save(step, force=force, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_saved(state)),
      record=ocp.args.JsonSave(record)))


def checkpoint_bytes(state) -> int:
  """What a checkpoint of `state` (arrays or their shapes) holds, in bytes,
  before compression."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(_saved(state)))


class Writer:
  """A run's saves: each starts in the background, and a failed one is
  reported by the next `poll` (after each step) as one line naming the
  checkpoint, the cause and the last good checkpoint."""

  def __init__(self, mngr: ocp.CheckpointManager, last_good: int | None):
    self.mngr, self.good, self.pending = mngr, last_good, None

  def save(self, state: TrainState, record: dict) -> None:
    self.poll(wait=True)
    step = int(state.step)
    with self._reported(step):
      save(self.mngr, state, record, force=True)
    self.pending = step

  def poll(self, wait: bool = False) -> None:
    """Notes a finished save; raises LongLoraError when it failed. Returns
    at once while one is still being written, unless `wait`."""
    if self.pending is None or (
        not wait and self.mngr.is_saving_in_progress()):
      return
    with self._reported(self.pending):
      self.mngr.wait_until_finished()
    self.good, self.pending = self.pending, None

  def close(self, failed: bool = False) -> None:
    """Waits for the last save; after a failure (`failed`), without
    reporting another."""
    errors = []
    for finish in (functools.partial(self.poll, wait=True), self.mngr.close):
      try:
        finish()  # The manager is closed after a failed poll too.
      except Exception as exc:  # noqa: BLE001 - the first is reported
        errors.append(exc)
    if failed or errors:
      # Orbax stops waiting at a save's first failed write, while its
      # other writes (each on a thread of its own) go on into the
      # temporary directory and can recreate it after it was removed.
      _join_orbax_threads()
      _remove_unfinished(Path(self.mngr.directory))
    if errors and not failed:
      raise errors[0]

  def _reported(self, step: int):
    return _save_errors(Path(self.mngr.directory), step, self.good)


def _join_orbax_threads(timeout_s: float = 60.0) -> None:
  for thread in threading.enumerate():
    if (thread is not threading.current_thread()
        and type(thread).__module__.startswith("orbax.")):
      thread.join(timeout_s)


def _remove_unfinished(directory: Path, step: int | str = "*") -> None:
  for tmp in directory.glob(f"{step}.orbax-checkpoint-tmp*"):
    shutil.rmtree(tmp, ignore_errors=True)  # Half a checkpoint: useless.


@contextlib.contextmanager
def _save_errors(directory: Path, step: int, good: int | None):
  try:
    yield
  except Exception as exc:
    _remove_unfinished(directory, step)
    cause, fix = os_cause(exc) or (
        f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", "fix that")
    kept = (f"the last good checkpoint is {directory / str(good)}"
            if good is not None else "no checkpoint was saved before it")
    raise LongLoraError(
        f"saving checkpoint {directory / str(step)} failed ({cause}); "
        f"training stopped; {kept}: {fix}, then continue with --resume"
    ) from None


def steps_in(directory: str | os.PathLike) -> list[int]:
  """The complete checkpoints in `directory` (its step-named directories;
  a save in progress has a temporary name), oldest first."""
  directory = Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and p.is_dir())


# The JSON files Orbax reads back: the checkpoint's, each item's, the arrays'.
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")


def unreadable(step_dir: str | os.PathLike) -> str | None:
  """Why the checkpoint in `step_dir` cannot be read completely, else None.

  Every JSON file is parsed and every stored value of the arrays read
  (TensorStore's key-value store, one value at a time), which finds
  truncated, emptied and missing files without restoring anything.
  """
  import tensorstore as ts
  step_dir = Path(step_dir)
  for item in ("state", "record"):
    if not (step_dir / item).is_dir():
      return f"{item}/ is missing"
  for f in sorted(step_dir.rglob("*")):
    if f.is_file() and (f.name in _JSON_FILES
                        or f.parent.name == "array_metadatas"):
      try:
        json.loads(f.read_bytes())
      except (ValueError, OSError) as e:
        return (f"{f.relative_to(step_dir)} is not valid JSON, truncated or "
                f"damaged ({type(e).__name__})")
  state = step_dir / "state"
  spec = {"driver": "ocdbt", "base": f"file://{state}/"} if (
      state / "manifest.ocdbt").exists() else f"file://{state}/"
  key = b""
  try:
    store = ts.KvStore.open(spec).result()
    for key in store.list().result():
      if store.read(key).result().state != "value":
        return f"state/ lists {key.decode()} but holds no data for it"
  except ValueError as e:
    where = f"reading {key.decode()}: " if key else ""
    error = str(e).splitlines()[0].replace(f"{state}/", "")
    return f"state/ data truncated, emptied or missing ({where}{error[:300]})"
  return None


def newest_readable(directory: str | os.PathLike
                    ) -> tuple[int | None, dict[int, str]]:
  """(the newest step in `directory` that reads completely or None,
  {newer step: why it is unreadable})."""
  bad = {}
  for step in reversed(steps_in(directory)):
    why = unreadable(Path(directory) / str(step))
    if why is None:
      return step, bad
    bad[step] = why
  return None, bad


def set_aside(directory: str | os.PathLike, steps) -> Path:
  """Moves the checkpoints `steps` out of `directory` into UNREADABLE beside
  it (never deletes them); returns that folder."""
  directory = Path(directory)
  aside = directory.parent / UNREADABLE
  aside.mkdir(exist_ok=True)
  for step in steps:
    target, n = aside / str(step), 1
    while target.exists():
      target, n = aside / f"{step}-{n}", n + 1
    (directory / str(step)).rename(target)
  return aside


def describe_unreadable(directory: str | os.PathLike,
                        bad: dict[int, str]) -> str:
  return "; ".join(f"{Path(directory) / str(step)} is unreadable ({why})"
                   for step, why in sorted(bad.items()))


def _shapes(leaves_with_paths) -> dict[str, tuple]:
  key = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
  return {".".join(map(key, path)): tuple(x.shape)
          for path, x in leaves_with_paths}


def restore(mngr: ocp.CheckpointManager, step: int,
            like: TrainState) -> tuple[TrainState, dict]:
  """(state, record) of `step`; `like` (an initial state of the same run)
  gives the tree, shapes, shardings and the frozen weights.

  Raises:
    CheckpointError: the checkpoint holds another model's state.
  """
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _saved(like))
  # Compared before reading, for a message that names the difference.
  stored = {x.name: tuple(x.shape) for x in jax.tree.leaves(
      mngr.item_metadata(step)["state"])}
  wanted = _shapes(jax.tree_util.tree_flatten_with_path(target)[0])
  names = sorted(set(stored) | set(wanted),
                 key=lambda n: (not n.startswith("trainable"), n))
  for name in names:
    if stored.get(name) != wanted.get(name):
      raise CheckpointError(
          f"{mngr.directory}/{step}: holds {name} with shape "
          f"{stored.get(name, 'absent')}, but this run's model needs "
          f"{wanted.get(name, 'none')}: a checkpoint of another model or "
          "LoRA configuration")
  try:
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        record=ocp.args.JsonRestore()))
  except (ValueError, OSError, RuntimeError) as e:
    # Damage `unreadable` cannot see (values that no longer decode).
    raise CheckpointError(
        f"{mngr.directory}/{step} is unreadable ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:200]}); move it out of "
        f"{mngr.directory} to continue from an older one") from None
  saved = out.state
  return TrainState(step=saved["step"], trainable=saved["trainable"],
                    frozen=like.frozen, opt_state=saved["opt_state"]), out.record


def read_record(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The JSON record saved with `step` (without reading the arrays)."""
  try:
    return mngr.restore(step, args=ocp.args.Composite(
        record=ocp.args.JsonRestore())).record
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f"{mngr.directory}/{step}: no readable record "
                          f"({type(e).__name__}: {e})") from None
