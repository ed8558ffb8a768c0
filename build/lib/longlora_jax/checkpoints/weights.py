"""Checkpoint weights tensor by tensor: reading safetensors (single or
sharded) and PyTorch `.bin` files (when torch is installed), and writing
safetensors files one tensor at a time."""

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
from safetensors import safe_open

from longlora_jax.core.errors import CheckpointError


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


@dataclasses.dataclass(frozen=True)
class Weights:
  """A checkpoint's tensors: `files` (name -> file), `shape(name)` without
  reading data, and `read(name, index)`, the part of one tensor that the
  tuple of slices `index` selects (safetensors reads only those bytes)."""
  files: dict[str, Path]
  shape: Callable[[str], tuple[int, ...]]
  read: Callable[..., np.ndarray]


def open_weights(directory: Path) -> Weights:
  """The weights of a checkpoint directory (safetensors, single or sharded,
  or PyTorch .bin)."""
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
  return Weights(files, lambda name: reader(files[name], name, "shape"),
                 lambda name, index=...: reader(files[name], name, index))


def _failing(file: Path, kind: str, fix: str):
  """A context turning a reader's errors into one CheckpointError."""
  @contextlib.contextmanager
  def guard():
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # the libraries raise many types for bad files
      raise CheckpointError(f"{file}: cannot read {kind} ({type(e).__name__}: "
                            f"{e}){fix}") from None
  return guard()


def safetensors_reader() -> Callable:
  """read(file, name, index=...) -> the array (or its `index` part);
  read(file, name, "shape") -> its shape; read(file, None) -> the file's
  tensor names."""
  handles = {}

  def read(file: Path, name: str | None, index=...):
    with _failing(file, "safetensors", "; the file is truncated or corrupt, "
                  "download it again"):
      if file not in handles:
        handles[file] = safe_open(str(file), framework="numpy")
      handle = handles[file]
      if name is None:
        return list(handle.keys())
      part = handle.get_slice(name)
      if isinstance(index, str):
        return tuple(part.get_shape())
      return part[index] if index is not ... else handle.get_tensor(name)
  return read


def torch_reader() -> Callable:
  """As `safetensors_reader`, over PyTorch .bin files (memory-mapped, one
  file at a time: a slice costs reading the tensor)."""
  try:
    import torch
  except ImportError:
    raise CheckpointError(
        "this checkpoint has only PyTorch .bin weights; install torch to read "
        "them, or convert the checkpoint to safetensors") from None
  state_dicts = {}

  def read(file: Path, name: str | None, index=...):
    if file not in state_dicts:
      with _failing(file, "PyTorch weights", ""):
        state_dicts.clear()  # Shards are read in order; keep one mapped.
        state_dicts[file] = torch.load(file, map_location="cpu",
                                       weights_only=True, mmap=True)
    state = state_dicts[file]
    if name is None:
      return list(state)
    tensor = state[name]
    if isinstance(index, str):
      return tuple(tensor.shape)
    tensor = tensor[index] if index is not ... else tensor
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16 of its own.
      return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
  return read


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16",
                       "int32": "I32", "int64": "I64"}


def write_safetensors(file: Path, specs: list[tuple[str, tuple, np.dtype]],
                      arrays: Iterable[np.ndarray], metadata=None) -> None:
  """Writes a safetensors file whose tensors are `specs` (name, shape,
  dtype), taking their values from `arrays` in the same order: the header
  is known from the shapes, so each value is written as it comes and only
  one is held at a time (safetensors' own `save_file` takes them all, and
  copies each to bytes besides)."""
  header, offset = {}, 0
  if metadata:
    header["__metadata__"] = metadata
  for name, shape, dtype in specs:
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _SAFETENSORS_DTYPES[np.dtype(dtype).name],
                    "shape": [int(d) for d in shape],
                    "data_offsets": [offset, offset + size]}
    offset += size
  head = json.dumps(header, separators=(",", ":")).encode()
  head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
  with open(file, "wb") as f:
    f.write(len(head).to_bytes(8, "little") + head)
    for (name, shape, dtype), array in zip(specs, arrays, strict=True):
      if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        raise ValueError(f"{name}: got {array.dtype}{list(array.shape)}, "
                         f"the header says {np.dtype(dtype)}{list(shape)}")
      # Little-endian bytes in C order; a view, not a copy.
      f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
