"""The demo's data: the standard library split by a CRC-32 of each file's
path (computed here bit by bit, by its definition), and the files written
from it."""

import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from longlora_jax.demo import stdlib


def _crc32(data: bytes) -> int:
  """CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), bit by bit."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


@pytest.fixture(scope="module")
def split():
  return stdlib.stdlib_files()


def test_crc32_reference_is_the_standard_one():
  assert _crc32(b"123456789") == 0xCBF43926  # the published check value


def test_one_file_in_twenty_by_its_path_is_held_out(split):
  train, held = split
  root = Path(sysconfig.get_paths()["stdlib"])
  skip = {"site-packages", "dist-packages", "test", "tests", "idle_test",
          "encodings", "__pycache__"}
  every = {Path(d, f) for d, dirs, files in os.walk(root)
           for f in files if f.endswith(".py")
           and not skip & set(Path(d).relative_to(root).parts)}
  assert set(train) | set(held) == every
  assert not set(train) & set(held)
  assert {p for p in every if _crc32(
      p.relative_to(root).as_posix().encode()) % 20 == 0} == set(held)
  assert 0.02 < len(held) / len(every) < 0.1


def test_the_split_is_written_once_in_a_seeded_order(tmp_path, monkeypatch):
  train_files = [Path(__file__), Path(stdlib.__file__)]
  held_files = [Path(json.__file__)]
  monkeypatch.setattr(stdlib, "stdlib_files",
                      lambda: (list(train_files), list(held_files)))
  train, held = stdlib.demo_data(tmp_path, seed=3)
  assert (train, held) == (tmp_path / "train.jsonl",
                           tmp_path / "heldout.jsonl")
  records = [json.loads(line) for line in train.open()]
  order = [train_files[i] for i in np.random.default_rng(3).permutation(2)]
  assert records == [{"text": p.read_text(), "path": p.name} for p in order]
  assert [json.loads(line)["path"] for line in held.open()] == ["__init__.py"]
  # Written once: a second call reads nothing again.
  monkeypatch.setattr(stdlib, "stdlib_files", None)
  assert stdlib.demo_data(tmp_path) == (train, held)


def test_a_model_trained_on_the_training_split_is_measured_on_the_other():
  d = Path("some") / "dir"
  assert stdlib.evaluation_data(str(d / "train.jsonl"), d) == str(
      d / "heldout.jsonl")
  assert stdlib.evaluation_data("pg19.jsonl", d) == "pg19.jsonl"
  assert stdlib.evaluation_data("runs/demo/data/train.jsonl") == (
      "runs/demo/data/heldout.jsonl")
