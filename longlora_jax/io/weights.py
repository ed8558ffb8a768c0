"""Reading checkpoint weights tensor by tensor: safetensors (single or
sharded) and PyTorch `.bin` files (when torch is installed)."""

import json
from pathlib import Path
from typing import Callable

import ml_dtypes
from safetensors import SafetensorError, safe_open

from longlora_jax.errors import CheckpointError


def _read_index(file: Path) -> dict[str, Path]:
  try:
    with open(file) as f:
      weight_map = json.load(f)["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise CheckpointError(f"{file}: not a valid weight index ({e!r})") from None
  files = {name: file.parent / shard for name, shard in weight_map.items()}
  for shard in sorted(set(files.values())):
    if not shard.exists():
      raise CheckpointError(f"{file}: lists {shard.name}, which is missing")
  return files


def open_weights(directory: Path) -> tuple[dict[str, Path], Callable]:
  """(tensor name -> file, read(name) -> np.ndarray) for a checkpoint dir."""
  st_index = directory / "model.safetensors.index.json"
  st_single = directory / "model.safetensors"
  pt_index = directory / "pytorch_model.bin.index.json"
  pt_single = directory / "pytorch_model.bin"
  if st_index.exists():
    files, reader = _read_index(st_index), safetensors_reader()
  elif st_single.exists():
    reader = safetensors_reader()
    files = {name: st_single for name in reader(st_single, None)}
  elif pt_index.exists() or pt_single.exists():
    reader = torch_reader()
    files = (_read_index(pt_index) if pt_index.exists()
             else {name: pt_single for name in reader(pt_single, None)})
  else:
    raise CheckpointError(
        f"{directory}: no weights found (expected model.safetensors, "
        "model.safetensors.index.json or pytorch_model*.bin)")
  return files, lambda name: reader(files[name], name)


def safetensors_reader() -> Callable:
  """read(file, name) -> array; read(file, None) -> the file's tensor names."""
  handles = {}

  def read(file: Path, name: str | None):
    try:
      if file not in handles:
        handles[file] = safe_open(str(file), framework="numpy")
      handle = handles[file]
      return list(handle.keys()) if name is None else handle.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(
          f"{file}: cannot read safetensors ({e}); the file is truncated or "
          "corrupt, download it again") from None
  return read


def torch_reader() -> Callable:
  try:
    import torch
  except ImportError:
    raise CheckpointError(
        "this checkpoint has only PyTorch .bin weights; install torch to read "
        "them, or convert the checkpoint to safetensors") from None
  state_dicts = {}

  def read(file: Path, name: str | None):
    if file not in state_dicts:
      try:
        state_dicts.clear()  # Shards are read in order; keep one mapped.
        state_dicts[file] = torch.load(file, map_location="cpu",
                                       weights_only=True, mmap=True)
      except Exception as e:  # torch raises many types for a bad file.
        raise CheckpointError(f"{file}: cannot read PyTorch weights "
                              f"({type(e).__name__}: {e})") from None
    state = state_dicts[file]
    if name is None:
      return list(state)
    tensor = state[name]
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16 of its own.
      return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
  return read
