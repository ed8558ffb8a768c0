import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from longlora_jax.core.errors import LongLoraError
from longlora_jax.core import lock
from tests.conftest import ROOT

HOLD = ("import sys, time; from longlora_jax.core import lock\n"
        "with lock.hold(sys.argv[1]):\n"
        "  print('held', flush=True); time.sleep(600)\n")


def _holder(directory):
  """Another process holding the lock of `directory`."""
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)],
                          stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
  assert proc.stdout.readline() == "held\n"
  return proc


def test_a_second_holder_is_refused_and_told_who_holds_it(tmp_path):
  run = tmp_path / "run"
  proc = _holder(run)
  try:
    with pytest.raises(LongLoraError) as error:
      with lock.hold(run):
        pass
    message = str(error.value)
    assert message.startswith(f"{run} is in use by another run (pid "
                              f"{proc.pid} on {socket.gethostname()}, "
                              "started 20")
    assert message.endswith("wait for it to end or stop it, or choose "
                            "another --out")
  finally:
    proc.kill()
    proc.wait()
  # A killed holder holds nothing: the kernel dropped its lock.
  with lock.hold(run) as path:
    assert path.exists()
  assert list(run.iterdir()) == []  # Released and removed.


def test_one_holder_at_a_time_even_within_a_process(tmp_path):
  run = tmp_path / "run"
  with lock.hold(run):
    pass
  with lock.hold(run):
    with pytest.raises(LongLoraError, match="in use by another run"):
      with lock.hold(run):
        pass


def test_sigterm_releases_it(tmp_path):
  run = tmp_path / "run"
  proc = _holder(run)
  proc.send_signal(signal.SIGTERM)
  proc.wait()
  for _ in range(50):
    try:
      with lock.hold(run):
        return
    except LongLoraError:
      time.sleep(0.1)
  pytest.fail("the lock outlived its process")
