"""Writing outputs so that a failure never leaves half of one: every file
and directory is written under a temporary name and renamed into place, and
a failure of the file system (full, read-only, not permitted) is one line
naming the path and the fix.

A write killed half way (SIGKILL, power loss) leaves its temporary sibling
behind; the next write of the same target reclaims it once its writer is
known to be gone (`reclaim_unfinished`), so no debris outlives a rerun.
"""

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import socket
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


# ---- unfinished writes: whose they are, and reclaiming them ----
#
# A temporary sibling is named for its target and its writer:
#   .NAME.partial-PID-START-NONCE@HOST   (a directory; .NAME.old-... is the
#                                         target it is replacing, set aside)
#   .STEM.partial-PID-START-NONCE@HOST.SUFFIX   (a file: its suffix stays
#                                         last, as np.save and savefig go by it)
# PID is the writing process, START its start time in clock ticks since boot
# (from /proc; 0 where there is none), so that a reused PID is not taken for
# the writer; HOST is the host name (letters, digits and '-', shortened) and
# a hash of the full name and the PID namespace (containers that share a
# host name do not see each other's processes).
_PROC = Path("/proc")


def _proc_stat(pid: int) -> tuple[str, int] | None:
  """(state, start time) of process `pid`, None when there is none."""
  try:
    text = (_PROC / str(pid) / "stat").read_text()
  except OSError:  # No such process, or one hidden from us.
    return None
  fields = text.rpartition(")")[2].split()  # The name may hold ") ".
  return fields[0], int(fields[19])


def _has_proc() -> bool:
  return (_PROC / "self" / "stat").exists()


@functools.cache
def _host() -> str:
  name = socket.gethostname()
  try:
    namespace = os.readlink("/proc/self/ns/pid")
  except OSError:
    namespace = ""
  short = re.sub(r"[^A-Za-z0-9-]", "-", name.split(".")[0])[:24] or "host"
  digest = hashlib.sha1(f"{name} {namespace}".encode()).hexdigest()[:4]
  return f"{short}-{digest}"


def _sibling(target: Path, kind: str, suffix: str = "") -> Path:
  """A new temporary sibling of `target`, named for this process."""
  pid = os.getpid()
  found = _proc_stat(pid) if _has_proc() else None
  stem = target.name[:len(target.name) - len(suffix)]
  return target.with_name(f".{stem}.{kind}-{pid}-{found[1] if found else 0}"
                          f"-{uuid.uuid4().hex[:8]}@{_host()}{suffix}")


def _writer_gone(pid: int, start: int, host: str) -> bool | None:
  """Whether the process that wrote a sibling has ended; None when it ran
  on another machine (or PID namespace), where no one here can tell."""
  if host != _host():
    return None
  found = _proc_stat(pid) if _has_proc() else None
  if found is not None:
    return (found[0] in "ZXx"  # Ended, not yet reaped.
            or bool(start) and found[1] != start)  # The PID is reused.
  try:  # No /proc, or one that hides others' processes.
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # Someone else's process: it runs.
    return False
  return False


def _size(path: Path) -> int:
  if path.is_dir() and not path.is_symlink():
    return sum(f.lstat().st_size for f in path.rglob("*") if not f.is_dir())
  return path.lstat().st_size


def reclaim_unfinished(target: str | os.PathLike, *, file: bool = False,
                       owned: bool = False) -> None:
  """Removes what interrupted writes of `target` (a directory, or a `file`)
  left beside it, saying so in one line each.

  The rule: a sibling named for `target` and for a writer on this host (and
  PID namespace) is removed when that process has ended, or its PID now
  belongs to a process started at another time; a set-aside previous
  `target` (.old-) is put back when `target` is missing, else removed. A
  sibling whose writer runs is never touched: two writes of one target
  each keep their own. One written from another host, as on a shared file
  system, or named as older versions did (no writer in the name), is never
  removed, since its writer cannot be seen from here; a note names it.
  Nothing else is ever touched, and a failure to reclaim is passed over
  (the write goes on). `owned`: the caller holds the lock of `target`'s
  directory (a run's), so no write of `target` can be running and every
  one found is unfinished, whoever wrote it.
  """
  target = Path(target)
  suffix = target.suffix if file else ""
  stem = target.name[:len(target.name) - len(suffix)]
  pattern = re.compile(re.escape(f".{stem}.") + r"(partial|old)-(?:(\d+)-"
                       r"(\d+)-[0-9a-f]{8}@([A-Za-z0-9-]+)|[0-9a-f]{8})"
                       + re.escape(suffix))
  try:
    names = sorted(os.listdir(target.parent))
  except OSError:
    return
  for name in names:
    if not (match := pattern.fullmatch(name)):
      continue
    kind, pid, start, host = match.groups()
    path = target.parent / name
    try:
      gone = owned or (pid and _writer_gone(int(pid), int(start), host))
      if gone is False:
        continue
      size = human_bytes(_size(path))
      if not gone:
        who = (f"pid {pid} on host {host.rpartition('-')[0]}" if pid else
               "an earlier version")
        print(f"note: {path} ({size}) is an unfinished write of "
              f"{target.name} by {who}; remove it if that run has ended")
      elif kind == "old" and not os.path.lexists(target):
        os.rename(path, target)
        print(f"note: restored {target}, which an interrupted run (pid "
              f"{pid}) had set aside to replace it")
      else:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() \
            else path.unlink()
        print(f"note: removed an unfinished write left by an interrupted "
              f"run{f' (pid {pid})' if pid else ''}: {path} ({size})")
    except (OSError, OverflowError):  # Reclaiming never fails a write.
      pass


# The sibling names interrupted writes leave: .STEM.partial-... or
# .STEM.old-..., a file's suffix last.
_UNFINISHED = re.compile(r"\.(?P<stem>.+?)\.(?:partial|old)-(?:\d+-\d+-"
                         r"[0-9a-f]{8}@[A-Za-z0-9-]+|[0-9a-f]{8})(?P<suffix>.*)")


def reclaim_all_unfinished(directory: str | os.PathLike, *,
                           owned: bool = False) -> None:
  """`reclaim_unfinished` for every target in `directory` that interrupted
  writes left something beside."""
  directory = Path(directory)
  try:
    names = os.listdir(directory)
  except OSError:
    return
  targets = {(m["stem"] + m["suffix"], bool(m["suffix"]))
             for name in names if (m := _UNFINISHED.fullmatch(name))}
  for name, file in sorted(targets):
    reclaim_unfinished(directory / name, file=file, owned=owned)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """A temporary sibling of the file `path` to write; it replaces `path`
  when the block completes and is removed if the block raises. What
  interrupted writes of `path` left is reclaimed first."""
  path = Path(path)
  reclaim_unfinished(path, file=True)
  tmp = _sibling(path, "partial", path.suffix)
  try:
    with reported(path):
      path.parent.mkdir(parents=True, exist_ok=True)
      yield tmp
      os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def read_json(path: str | os.PathLike, *, missing: str,
              error: type[LongLoraError] = LongLoraError):
  """The JSON value in `path`; `error` in one line when the file is absent
  (with `missing`, the message that names the fix) or not valid JSON."""
  if not os.path.exists(path):
    raise error(missing)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise error(f"{path}: not valid JSON ({e})") from None


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
  completes, and is removed if it raises, so `out` is never partial. What
  interrupted writes of `out` left is reclaimed first."""
  out = Path(out)
  reclaim_unfinished(out)
  tmp = _sibling(out, "partial")
  try:
    with reported(out):
      tmp.mkdir(parents=True)
      yield tmp
      if out.exists():
        old = _sibling(out, "old")
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
