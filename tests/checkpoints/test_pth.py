"""Our torch-free reader of `torch.save` files against torch.load."""

import dataclasses
import os
import zipfile

import ml_dtypes
import numpy as np
import pytest

from longlora_jax import CheckpointError
from longlora_jax.checkpoints.pth import open_pth
from tests.references import hf_models
from tests.references.hf_models import torch  # None without PyTorch


@pytest.fixture(autouse=True)
def _needs_torch():
  hf_models.require("torch")


def _numpy(tensor) -> np.ndarray:
  if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16 of its own
    return tensor.contiguous().view(torch.int16).numpy().view(
        ml_dtypes.bfloat16)
  return tensor.numpy()


def _state(dtype):
  """Tensors of `dtype` as a state dict holds them, and views that share a
  storage: a slice with an offset, a strided slice, a transpose, and one
  storage with views of different shapes."""
  gen = torch.Generator().manual_seed(0)
  base = torch.randn(12, 10, generator=gen).to(dtype)
  return {"weight": torch.randn(7, 5, generator=gen).to(dtype),
          "scalar": torch.tensor(3.5, dtype=dtype),
          "empty": torch.zeros(0, 4, dtype=dtype),
          "offset": base[5:],
          "strided": base[1:11:3, 2::4],
          "transposed": base.t(),
          "flat": base.view(-1)[7:31]}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_whole_tensors_equal_torch_load(tmp_path, dtype):
  state = _state(getattr(torch, dtype))
  torch.save(state, tmp_path / "x.pth")
  ours, theirs = open_pth(tmp_path / "x.pth"), torch.load(
      tmp_path / "x.pth", weights_only=True)
  assert sorted(ours) == sorted(theirs)
  for name, tensor in theirs.items():
    got = ours[name].read()
    assert got.dtype == np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16"
                                 else dtype), name
    assert ours[name].shape == tuple(tensor.shape), name
    np.testing.assert_array_equal(got, _numpy(tensor), err_msg=name)


def test_parts_equal_torch_indexing(tmp_path):
  state = _state(torch.float32)
  torch.save(state, tmp_path / "x.pth")
  ours = open_pth(tmp_path / "x.pth")
  rows = [9, 2, 3, 4, 0, 3]  # unordered, repeated: read as runs
  for name in ("offset", "strided", "transposed"):
    tensor = state[name]
    for index in [(slice(1, 3),), (slice(None), slice(1, 3)),
                  (slice(0, None, 2), slice(1, None, 3)), (slice(2, 2),)]:
      np.testing.assert_array_equal(ours[name].read(index),
                                    tensor[index].numpy())
    picked = [r for r in rows if r < tensor.shape[0]]
    np.testing.assert_array_equal(
        ours[name].read((picked, slice(1, 3))), tensor[picked, 1:3].numpy())


def test_a_part_reads_only_its_bytes(tmp_path):
  # Each read of the file's bytes is recorded, and served from a copy in
  # which every byte outside the part is NaN: the part must come out
  # exact, from exactly its own rows.
  matrix = torch.randn(64, 32)
  torch.save({"m": matrix}, tmp_path / "x.pth")
  tensor = open_pth(tmp_path / "x.pth")["m"]
  row = 32 * 4
  for rows, cols, want in [((10, 14), (0, 32), [(10 * row, 14 * row)]),
                           ((10, 14), (8, 16), [(10 * row + 32,
                                                 13 * row + 64)])]:
    asked = []
    poisoned = np.full(64 * 32, np.nan, np.float32)
    poisoned.reshape(64, 32)[slice(*rows), slice(*cols)] = (
        matrix[slice(*rows), slice(*cols)].numpy())

    def source(lo, hi):
      asked.append((lo, hi))
      return memoryview(poisoned.view(np.uint8))[lo:hi]
    part = dataclasses.replace(tensor, source=source).read(
        (slice(*rows), slice(*cols)))
    np.testing.assert_array_equal(part, matrix[slice(*rows),
                                               slice(*cols)].numpy())
    assert asked == want
  # Scattered rows: one read per run of consecutive rows, none between.
  asked = []
  whole = tensor.source(0, 64 * row)
  dataclasses.replace(tensor, source=lambda lo, hi: asked.append(
      (lo, hi)) or whole[lo:hi]).read(([40, 3, 4, 41, 5],))
  assert asked == [(3 * row, 6 * row), (40 * row, 42 * row)]


def test_state_dict_of_a_module(tmp_path):
  # nn.Module.state_dict() is an OrderedDict carrying `_metadata`.
  module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
  torch.save(module.state_dict(), tmp_path / "m.pth")
  ours = open_pth(tmp_path / "m.pth")
  for name, tensor in module.state_dict().items():
    np.testing.assert_array_equal(ours[name].read(), tensor.numpy())


class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  torch.save({"w": torch.ones(2), "x": _Payload(marker)}, tmp_path / "evil.pth")
  with pytest.raises(CheckpointError) as e:
    open_pth(tmp_path / "evil.pth")
  message = str(e.value)
  assert "\n" not in message and str(tmp_path / "evil.pth") in message
  assert f"global {os.system.__module__}.system" in message
  assert not marker.exists()


@pytest.mark.parametrize("what,message", [
    ("int64", r"global torch.LongStorage"),
    ("legacy", r"not a torch.save zip archive .*re-saved with a newer torch"),
    ("truncated", r"not a torch.save zip archive|storage data/0 is shorter"),
    ("not_a_dict", r"not a state dict of tensors"),
    ("no_pickle", r"no single <folder>/data.pkl"),
])
def test_bad_files(tmp_path, what, message):
  file = tmp_path / "bad.pth"
  if what == "int64":
    torch.save({"ids": torch.arange(4)}, file)
  elif what == "legacy":
    torch.save({"w": torch.ones(2)}, file,
               _use_new_zipfile_serialization=False)
  elif what == "truncated":
    torch.save({"w": torch.ones(1000)}, file)
    file.write_bytes(file.read_bytes()[:2000])
  elif what == "not_a_dict":
    torch.save([torch.ones(2)], file)
  elif what == "no_pickle":
    with zipfile.ZipFile(file, "w") as z:
      z.writestr("archive/other.txt", "hi")
  with pytest.raises(CheckpointError, match=message) as e:
    open_pth(file)
  assert "\n" not in str(e.value) and str(file) in str(e.value)
