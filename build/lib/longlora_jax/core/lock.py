"""One process at a time in a directory: an advisory lock (flock) on a file
in it, which says who holds it. The kernel releases the lock when its
process ends, however it ends, so a lock is never stale; a process that
ends normally also removes the file."""

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from longlora_jax.core.errors import LongLoraError
from longlora_jax.core.files import reported

LOCK_FILE = ".lock"


def _holder(text: str) -> str:
  try:
    h = json.loads(text)
    return f"pid {h['pid']} on {h['host']}, started {h['started']}"
  except (ValueError, KeyError, TypeError):
    return "a process that has not said who it is yet"


@contextlib.contextmanager
def hold(directory: str | os.PathLike) -> Iterator[Path]:
  """Holds the lock of `directory` (created if missing) for the block.

  Raises:
    LongLoraError: another process holds it (named: pid, host, start time).
  """
  directory = Path(directory)
  path = directory / LOCK_FILE
  with reported(directory):
    directory.mkdir(parents=True, exist_ok=True)
    f = _acquire(path)
  try:
    with reported(directory):
      f.seek(0)
      f.truncate()
      f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                          "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
      f.flush()
    yield path
  finally:
    path.unlink(missing_ok=True)  # Still held: no one can take it meanwhile.
    f.close()  # Releases it.


def _acquire(path: Path):
  """The lock file `path`, open and locked by this process."""
  while True:
    f = open(path, "a+", encoding="utf-8")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = _holder(f.read())
      f.close()
      raise LongLoraError(
          f"{path.parent} is in use by another run ({holder}); wait for it "
          "to end or stop it, or choose another --out") from None
    # Locked; but its holder may have removed the file meanwhile, and a
    # lock on a removed file excludes no one: then take the new file.
    try:
      if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
        return f
    except FileNotFoundError:
      pass
    f.close()
