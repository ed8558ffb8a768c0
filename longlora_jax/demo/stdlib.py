"""The demo's data: the Python standard library's source, text every
machine with Python has.

It splits by a hash of each file's path: 1 in 20 files is held out for
evaluation and never trained on; the rest is training data.
"""

import json
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from longlora_jax.core.errors import LongLoraError
from longlora_jax.core.files import atomic_path

DATA_DIR = Path("runs") / "demo" / "data"
# Directories of the standard library that are not its own prose and code:
# installed packages (differ per machine), test suites, codec tables.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test",
              "encodings", "__pycache__"}
_HELD_OUT_ONE_IN = 20


def stdlib_files() -> tuple[list[Path], list[Path]]:
  """(training files, held-out files) of this Python's standard library."""
  root = Path(sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in root.rglob("*.py")
                 if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
  if len(files) < 100:
    raise LongLoraError(
        f"{root}: found {len(files)} Python source files; the demo trains on "
        "the standard library's source, which this Python does not ship")
  held = lambda p: zlib.crc32(p.relative_to(root).as_posix().encode()) % (
      _HELD_OUT_ONE_IN) == 0
  return ([p for p in files if not held(p)], [p for p in files if held(p)])


def _split(directory: str | os.PathLike) -> tuple[Path, Path]:
  """(train.jsonl, heldout.jsonl) in `directory`."""
  return Path(directory) / "train.jsonl", Path(directory) / "heldout.jsonl"


def demo_data(directory: str | os.PathLike = DATA_DIR,
              seed: int = 0) -> tuple[Path, Path]:
  """(train.jsonl, heldout.jsonl): the standard library split, one
  {"text", "path"} record per file, training files in a seeded order."""
  directory, out = Path(directory), _split(directory)
  if all(p.exists() for p in out):
    return out
  train, held = stdlib_files()
  order = np.random.default_rng(seed).permutation(len(train))
  train = [train[i] for i in order]
  directory.mkdir(parents=True, exist_ok=True)
  for path, files in zip(out, (train, held)):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
      for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        f.write(json.dumps({"text": text, "path": p.name}) + "\n")
  return out


def evaluation_data(data: str, directory: str | os.PathLike = DATA_DIR
                    ) -> str:
  """What to measure a model trained on `data` with: the held-out split in
  place of the training split (of `directory`); other data as it is."""
  train, held = _split(directory)
  return str(held) if Path(data) == train else data
