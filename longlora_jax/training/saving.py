"""Orbax checkpoints of a training run: what trains, its optimizer state, the
step, and a JSON record (data position, last loss).

The frozen weights are not saved: they are the base checkpoint's, reloaded
from it, so a LoRA+ checkpoint of a 7B model is a few hundred MB, not 13 GB.
Orbax writes each step to a temporary directory and renames it when
complete, asynchronously after copying the arrays off the device, and keeps
the newest `keep` steps.
"""

import os

import jax
import orbax.checkpoint as ocp

from longlora_jax.errors import CheckpointError
from longlora_jax.training.step import TrainState


def manager(directory: str | os.PathLike, *, keep: int | None = None,
            read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` (async saves, newest `keep` kept)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=True, read_only=read_only,
      create=not read_only)
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
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore()))
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
