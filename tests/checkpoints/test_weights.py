import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from longlora_jax.checkpoints.weights import open_weights, write_safetensors


def test_written_one_at_a_time_reads_back_in_safetensors(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {"b": rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16),
             "a": rng.normal(size=(7,)).astype(np.float32),
             "c.weight": rng.normal(size=(2, 3, 1)).astype(np.float16),
             "empty": np.zeros((0, 4), np.float32)}
  given = []

  def values():  # the writer takes each only when it writes it
    for name, value in tensors.items():
      given.append(name)
      yield value
  file = tmp_path / "x.safetensors"
  write_safetensors(file, [(k, v.shape, v.dtype) for k, v in tensors.items()],
                    values(), metadata={"format": "pt"})
  assert given == list(tensors)
  back = load_file(file)
  assert sorted(back) == sorted(tensors)
  for name, value in tensors.items():
    assert back[name].dtype == value.dtype and back[name].shape == value.shape
    np.testing.assert_array_equal(back[name], value)
  with safe_open(str(file), framework="numpy") as f:
    assert f.metadata() == {"format": "pt"}
  # The data starts 8-byte aligned, as the format asks.
  assert int.from_bytes(file.read_bytes()[:8], "little") % 8 == 0
  # Our reader reads a part of it.
  (tmp_path / "model.safetensors").write_bytes(file.read_bytes())
  weights = open_weights(tmp_path)
  np.testing.assert_array_equal(weights.read("b", (slice(1, 3), slice(None))),
                                tensors["b"][1:3])


def test_a_value_unlike_its_header_is_refused(tmp_path):
  with pytest.raises(ValueError, match="x: got float64.*header says float32"):
    write_safetensors(tmp_path / "x.safetensors", [("x", (2,), np.float32)],
                      [np.zeros(2)])
