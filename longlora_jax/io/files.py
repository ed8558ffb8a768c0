"""Writing outputs so that a failure never leaves half of one: every file
and directory is written under a temporary name and renamed into place."""

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from longlora_jax.errors import CheckpointError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """A temporary sibling of the file `path` to write; it replaces `path`
  when the block completes and is removed if the block raises."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # The suffix stays last: writers such as np.save and savefig go by it.
  tmp = path.with_name(f".{path.stem}.partial-{uuid.uuid4().hex[:8]}"
                       f"{path.suffix}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
  with atomic_path(path) as tmp:
    tmp.write_text(text, encoding="utf-8")
  return Path(path)


def write_json(path: str | os.PathLike, obj) -> Path:
  """`obj` as indented JSON with sorted keys (as transformers writes its
  configs), atomically."""
  return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
  """A temporary sibling of the directory `out` to write into; it replaces
  `out` (an existing one is swapped out, then removed) when the block
  completes, and is removed if it raises, so `out` is never partial."""
  out = Path(out)
  tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
  try:
    tmp.mkdir(parents=True)
    yield tmp
    if out.exists():
      old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
      out.rename(old)
      tmp.rename(out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      tmp.rename(out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
  """`out_dir` as an absolute path, refused if it holds files and not
  `overwrite`."""
  out = Path(out_dir).expanduser().absolute()
  if out.exists() and not out.is_dir():
    raise CheckpointError(f"{out}: exists and is not a directory")
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise CheckpointError(f"{out}: exists and is not empty; choose another "
                          "directory or pass overwrite=True")
  return out
