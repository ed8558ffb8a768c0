"""PyTorch `torch.save` files read without torch: a state dict of bf16, fp16
or fp32 tensors, each tensor lazy and each read touching only its bytes.

The format (torch >= 1.6, torch/serialization.py): a zip archive whose
entries, under one top folder, are `data.pkl` (the pickled object, in which
every storage is a persistent id `("storage", torch.<T>Storage, key,
location, numel)` and every tensor `torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, requires_grad, hooks[, metadata])`), `data/<key>` (the
raw bytes of each storage, stored uncompressed) and `byteorder`. The pickle
is read with an unpickler that builds only those objects, so a file cannot
run code; the storages are memory-mapped byte ranges of the file.
"""

import collections
import dataclasses
import mmap
import pickle
import re
import zipfile
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from longlora_jax.core.errors import CheckpointError

# torch's pickled storage classes -> their element types.
_STORAGES = {"BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
             "HalfStorage": np.dtype(np.float16),
             "FloatStorage": np.dtype(np.float32)}
_ALLOWED = ("torch._utils._rebuild_tensor_v2, collections.OrderedDict, "
            + ", ".join(f"torch.{s}" for s in _STORAGES))
_LOCAL_HEADER = 30  # bytes of a zip local file header before its name


@dataclasses.dataclass(frozen=True, eq=False)
class LazyTensor:
  """A tensor of a `torch.save` file, not yet read.

  shape, dtype: as torch has them; stride, offset: in elements of its
  storage, whose bytes `source(lo, hi)` gives (a view of the mapped file).
  """
  shape: tuple[int, ...]
  dtype: np.dtype
  stride: tuple[int, ...]
  offset: int
  source: Callable[[int, int], memoryview]

  def read(self, index=...) -> np.ndarray:
    """The part `index` selects, a new C-ordered array. `index`: `...` or a
    tuple, one entry per leading axis, of slices or 1-D arrays of indices
    (read as runs of consecutive indices, so a scattered set of rows costs
    its rows, not their span). Only the bytes from the part's first element
    to its last are touched; for a slice of rows, exactly its bytes."""
    index = _normalize(index, self.shape)
    for axis, entry in enumerate(index):
      if not isinstance(entry, slice):
        return self._gather(index, axis, entry)
    return self._block(index)

  def _gather(self, index, axis, wanted):
    present = np.unique(wanted)
    breaks = np.flatnonzero(np.diff(present) != 1) + 1
    parts = [self.read(index[:axis] + (slice(int(run[0]), int(run[-1]) + 1),)
                       + index[axis + 1:])
             for run in np.split(present, breaks) if run.size]
    shape = [_length(e) for e in index]
    shape[axis] = 0
    block = (np.concatenate(parts, axis) if parts
             else np.empty(shape, self.dtype))
    return np.take(block, np.searchsorted(present, wanted), axis)

  def _block(self, index):
    lengths = tuple(_length(s) for s in index)
    if 0 in lengths:
      return np.empty(lengths, self.dtype)
    first = self.offset + sum(s.start * st for s, st in zip(index,
                                                             self.stride))
    span = 1 + sum((n - 1) * s.step * st
                   for n, s, st in zip(lengths, index, self.stride))
    size = self.dtype.itemsize
    data = self._bytes(first * size, (first + span) * size)
    view = np.ndarray(lengths, self.dtype, buffer=data, strides=[
        s.step * st * size for s, st in zip(index, self.stride)])
    return np.array(view, order="C")

  def _bytes(self, lo: int, hi: int) -> memoryview:
    return self.source(lo, hi)


def _length(entry) -> int:
  return len(range(entry.start, entry.stop, entry.step)) if isinstance(
      entry, slice) else len(entry)


def _normalize(index, shape) -> tuple:
  """Slices with explicit start/stop/step > 0, or int64 index arrays."""
  index = () if index is ... else tuple(index) if isinstance(
      index, tuple) else (index,)
  if len(index) > len(shape):
    raise IndexError(f"{len(index)} indices for a {len(shape)}-d tensor")
  out = []
  for entry, n in zip(index + (slice(None),) * (len(shape) - len(index)),
                      shape):
    if isinstance(entry, slice):
      entry = slice(*entry.indices(n))
      if entry.step <= 0:
        raise IndexError("only positive slice steps are supported")
    else:
      entry = np.asarray(entry, np.int64).reshape(-1)
      if entry.size and (entry.min() < 0 or entry.max() >= n):
        raise IndexError(f"index out of range for an axis of {n}")
      if entry.size and np.all(np.diff(entry) == 1):  # one run: a slice
        entry = slice(int(entry[0]), int(entry[-1]) + 1, 1)
    out.append(entry)
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: np.dtype


class _Unpickler(pickle.Unpickler):
  """Builds a state dict of LazyTensors and nothing else."""

  def __init__(self, data: bytes, file: Path, storage: Callable):
    import io
    super().__init__(io.BytesIO(data))
    self.file, self.storage = file, storage

  def find_class(self, module, name):
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return self._rebuild
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch" and name in _STORAGES:
      return _StorageType(_STORAGES[name])
    raise CheckpointError(
        f"{self.file}: refuses to unpickle the global {module}.{name} (a "
        f"state dict of bf16/fp16/fp32 tensors needs only {_ALLOWED}); the "
        "file holds something else, or is not safe to load")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise CheckpointError(f"{self.file}: unknown persistent id {pid!r} in "
                            "data.pkl; not a torch.save state dict")
    _, kind, key, _, numel = pid
    return self.storage(str(key), kind.dtype, int(numel))

  def _rebuild(self, storage, offset, size, stride, *_):
    source, dtype, numel = storage
    shape, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
    if len(shape) != len(stride) or (0 not in shape and last >= numel):
      raise CheckpointError(f"{self.file}: a tensor of shape {shape} lies "
                            "outside its storage; the file is corrupt")
    return LazyTensor(shape, dtype, stride, int(offset), source)


def open_pth(path: str | Path) -> dict[str, LazyTensor]:
  """The tensors of a `torch.save` state dict file, by name, unread (the
  file is memory-mapped; no torch needed). Raises CheckpointError, naming
  the file, for a file that is not such a state dict, is truncated, or
  pickles anything beyond tensors (see `_Unpickler`)."""
  path = Path(path)
  try:
    with open(path, "rb") as f:
      mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    archive = zipfile.ZipFile(path)
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise CheckpointError(
        f"{path}: not a torch.save zip archive ({e}); files from torch "
        "< 1.6 must be re-saved with a newer torch") from None
  with archive:
    entries = {info.filename: info for info in archive.infolist()}
    tops = [n for n in entries if re.fullmatch(r"[^/]+/data\.pkl", n)]
    if len(tops) != 1:
      raise CheckpointError(f"{path}: no single <folder>/data.pkl in the "
                            "archive; not a torch.save file")
    top = tops[0][:-len("data.pkl")]
    order = entries.get(top + "byteorder")
    if order is not None and archive.read(order) != b"little":
      raise CheckpointError(f"{path}: saved big-endian; re-save it on a "
                            "little-endian machine")
    data = archive.read(tops[0])
  whole = memoryview(mapped)

  def storage(key, dtype, numel):
    info = entries.get(f"{top}data/{key}")
    if info is None or info.compress_type != zipfile.ZIP_STORED:
      raise CheckpointError(f"{path}: storage data/{key} is missing or "
                            "compressed; the file is corrupt")
    header = whole[info.header_offset:info.header_offset + _LOCAL_HEADER]
    if bytes(header[:4]) != b"PK\x03\x04":
      raise CheckpointError(f"{path}: bad zip header for data/{key}")
    start = (info.header_offset + _LOCAL_HEADER
             + int.from_bytes(header[26:28], "little")
             + int.from_bytes(header[28:30], "little"))
    nbytes = numel * dtype.itemsize
    if nbytes > info.file_size or start + nbytes > len(whole):
      raise CheckpointError(f"{path}: storage data/{key} is shorter than "
                            "its tensors; the file is truncated, download "
                            "it again")
    return (lambda lo, hi: whole[start + lo:start + hi]), dtype, numel

  state = _Unpickler(data, path, storage).load()
  if not (isinstance(state, dict) and all(
      isinstance(k, str) and isinstance(v, LazyTensor)
      for k, v in state.items())):
    raise CheckpointError(f"{path}: not a state dict of tensors")
  return dict(state)
