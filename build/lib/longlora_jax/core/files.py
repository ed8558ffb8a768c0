"""Writing outputs so that a failure never leaves half of one: every file
and directory is written under a temporary name and renamed into place, and
a failure of the file system (full, read-only, not permitted) is one line
naming the path and the fix."""

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from longlora_jax.core.errors import CheckpointError, LongLoraError

_ELSEWHERE = "or write elsewhere (another --out)"
# errno -> (what happened, the fix).
_CAUSES = {
    errno.ENOSPC: ("no space left on device", f"free space there {_ELSEWHERE}"),
    errno.EDQUOT: ("disk quota exceeded", f"free space there {_ELSEWHERE}"),
    errno.EROFS: ("read-only file system", "write elsewhere (another --out)"),
    errno.EACCES: ("permission denied", "make it writable (chmod/chown) "
                   f"{_ELSEWHERE}"),
    errno.EPERM: ("operation not permitted", "make it writable (chmod/chown) "
                  f"{_ELSEWHERE}"),
    errno.ENOTDIR: ("a file stands where a directory should be",
                    "move the file away or write elsewhere (another --out)"),
}
# How libraries that are not Python spell an errno in their messages:
# safetensors "(os error 28)", TensorStore "[os_error_code='28']".
_ERRNO_TEXT = re.compile(r"os error (\d+)|os_error_code='(\d+)'")


def os_errno(exc: BaseException) -> int | None:
  """The errno of the operating-system error behind `exc` (an OSError in its
  chain, or one named in its text), else None."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno:
      return exc.errno
    if match := _ERRNO_TEXT.search(str(exc)):
      return int(match.group(1) or match.group(2))
    exc = exc.__cause__ or exc.__context__
  return None


def os_cause(exc: BaseException) -> tuple[str, str] | None:
  """(what happened, the fix) when `exc` is the file system refusing a
  write, else None."""
  return _CAUSES.get(os_errno(exc))


def output_error(path: str | os.PathLike, exc: BaseException
                 ) -> LongLoraError | None:
  """`exc` as one line naming `path`, the cause and the fix, when the file
  system refused a write; None for any other error."""
  if (found := os_cause(exc)) is None:
    return None
  cause, fix = found
  return LongLoraError(f"{path}: cannot write there ({cause}); {fix}")


@contextlib.contextmanager
def reported(path: str | os.PathLike) -> Iterator[None]:
  """Writing to `path` inside the block: a refusal of the file system
  becomes `output_error`'s one line."""
  try:
    yield
  except Exception as e:
    error = output_error(path, e)
    if error is None:
      raise
    raise error from None


def _existing(path: Path) -> Path:
  """`path`, or its nearest parent that exists."""
  while not path.exists():
    path = path.parent
  return path


def free_bytes(path: str | os.PathLike) -> int:
  """Free space for `path` (which may not exist yet), in bytes."""
  return shutil.disk_usage(_existing(Path(path).absolute())).free


def human_bytes(n: float) -> str:
  for unit in ("bytes", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
    n /= 1024


def check_writable(path: str | os.PathLike) -> Path:
  """`path` (a directory to write, which may not exist yet) as an absolute
  path, after a test write into it or its nearest existing parent; raises
  the one-line error of `output_error` before any work when that fails."""
  path = Path(path).expanduser().absolute()
  where = _existing(path)
  if not where.is_dir():
    raise LongLoraError(f"{path}: {where} is a file, not a directory; "
                        "move it away or write elsewhere (another --out)")
  try:
    with reported(path):
      fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=where)
      os.close(fd)
      os.unlink(probe)
  except OSError as e:  # A refusal with no fix of its own (e.g. /proc).
    raise LongLoraError(f"{path}: cannot write there ({e.strerror or e}); "
                        "write elsewhere (another --out)") from None
  return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """A temporary sibling of the file `path` to write; it replaces `path`
  when the block completes and is removed if the block raises."""
  path = Path(path)
  # The suffix stays last: writers such as np.save and savefig go by it.
  tmp = path.with_name(f".{path.stem}.partial-{uuid.uuid4().hex[:8]}"
                       f"{path.suffix}")
  try:
    with reported(path):
      path.parent.mkdir(parents=True, exist_ok=True)
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
    with reported(out):
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
