import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from longlora_jax.core import files
from longlora_jax.core.errors import LongLoraError
from longlora_jax.core.files import (atomic_dir, atomic_path, check_writable,
                                     os_errno, output_error,
                                     reclaim_unfinished, write_json)
from tests.conftest import ROOT


def test_os_errno_reads_python_rust_and_tensorstore_errors():
  assert os_errno(OSError(errno.ENOSPC, "No space left on device")) == 28
  # As safetensors (Rust) and TensorStore (C++) word them, verbatim.
  assert os_errno(RuntimeError("Error while serializing: IoError(Os { code: "
                               "28, kind: StorageFull, message: \"No space "
                               "left on device\" }) (os error 28)")) == 28
  assert os_errno(ValueError("RESOURCE_EXHAUSTED: Failed to write 113 bytes "
                             "to file 6: No space left on device "
                             "[os_error_code='28']")) == 28
  try:
    try:
      raise OSError(errno.EROFS, "Read-only file system")
    except OSError as e:
      raise RuntimeError("wrapped") from e
  except RuntimeError as e:
    assert os_errno(e) == errno.EROFS
  assert os_errno(ValueError("no errno here")) is None


@pytest.mark.parametrize("code,cause,fix", [
    (errno.ENOSPC, "no space left on device", "free space there"),
    (errno.EROFS, "read-only file system", "write elsewhere (another --out)"),
    (errno.EACCES, "permission denied", "make it writable (chmod/chown)"),
])
def test_output_error_names_path_cause_and_fix(code, cause, fix):
  error = output_error("/x/out", OSError(code, os.strerror(code)))
  assert str(error).startswith(f"/x/out: cannot write there ({cause}); {fix}")
  assert output_error("/x/out", ValueError("a bug")) is None


def test_check_writable_refuses_a_read_only_directory(read_only_dir):
  out = read_only_dir / "run" / "deeper"
  with pytest.raises(LongLoraError, match=r"read_only/run/deeper: cannot "
                     r"write there \((read-only file system|permission "
                     r"denied)\)"):
    check_writable(out)
  assert not out.exists()


def test_check_writable_creates_nothing(tmp_path):
  assert check_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
  assert list(tmp_path.iterdir()) == []
  (tmp_path / "file").write_text("x")
  with pytest.raises(LongLoraError, match="is a file, not a directory"):
    check_writable(tmp_path / "file" / "out")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs procfs")
def test_check_writable_names_any_other_refusal():
  # procfs takes no new files (ENOENT): one line all the same.
  with pytest.raises(LongLoraError, match=r"^/proc/out: cannot write there "
                     r"\(No such file or directory\); write elsewhere"):
    check_writable("/proc/out")


def test_a_full_disk_is_one_line_and_leaves_nothing(small_fs):
  # A real full file system: a 64 KiB tmpfs. safetensors (Rust) reports
  # it as the export in the issue saw it.
  from safetensors.numpy import save_file
  fs = small_fs(64 * 1024)
  with pytest.raises(LongLoraError, match=rf"^{fs}/model: cannot write there "
                     r"\(no space left on device\); free space there"):
    with atomic_dir(fs / "model") as tmp:
      save_file({"w": np.zeros(1 << 18, np.float32)},
                tmp / "model.safetensors")
  with pytest.raises(LongLoraError, match=rf"^{fs}/big.json: cannot write "
                     r"there \(no space left"):
    write_json(fs / "big.json", {"x": "y" * (1 << 20)})
  assert list(fs.iterdir()) == []


def test_atomic_path_keeps_other_errors(tmp_path):
  with pytest.raises(ZeroDivisionError):
    with atomic_path(tmp_path / "f.txt"):
      1 / 0
  assert list(tmp_path.iterdir()) == []


# ---- writes killed half way, and what the next write does ----

# A process that starts writing a directory and a file atomically, then
# waits for a line on stdin (or, given "kill", kills itself mid-write).
_WRITER = """
import os, signal, sys
from pathlib import Path
from longlora_jax.core.files import atomic_dir, atomic_path
out = Path(sys.argv[1])
with atomic_dir(out / "hf") as d, atomic_dir(out / "hf") as d2, \\
    atomic_path(out / "x.npy") as f:
  (d / "model.safetensors").write_bytes(b"w" * 5000)
  f.write_bytes(b"t" * 100)
  if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
  print("writing", flush=True)
  sys.stdin.readline()
"""
_OWNED = r"\.(?:hf|x)\.partial-(\d+)-(\d+)-[0-9a-f]{8}@([A-Za-z0-9-]+)(?:\.npy)?"


def _writer(directory, then):
  proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(directory), then],
                          cwd=ROOT, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
  if then == "kill":
    assert proc.wait(timeout=60) == -signal.SIGKILL
  else:
    assert proc.stdout.readline() == "writing\n"
  return proc


def _partials(directory):
  return sorted(n for n in os.listdir(directory) if re.fullmatch(_OWNED, n))


def test_a_killed_writers_debris_goes_with_the_next_write(tmp_path, capsys):
  proc = _writer(tmp_path, "kill")
  orphans = _partials(tmp_path)
  # Named for their writer: its pid, start time and host; a file keeps its
  # suffix last.
  assert len(orphans) == 3 and all(
      re.fullmatch(_OWNED, n)[1] == str(proc.pid) for n in orphans)
  assert sum(n.endswith(".npy") for n in orphans) == 1
  host = re.fullmatch(_OWNED, orphans[0])[3]
  others = [  # Never touched: not a partial of hf, or not named as one.
      "notes.txt", ".hf.partial", f"hf.partial-{proc.pid}-0-0badf00d@{host}",
      f".hfx.partial-{proc.pid}-0-0badf00d@{host}",
      f".hf.partial-{proc.pid}-0-0badf0@{host}",
      f".hf.partial-{proc.pid}-0-0badf00d@{host}.json"]
  for name in others:
    (tmp_path / name).write_text("keep")
  # Sizes by hand: the weights 5,000 bytes, the other directory empty, the
  # file 100 bytes.
  size = lambda name: ("100 bytes" if name.endswith(".npy") else "4.9 KiB"
                       if (tmp_path / name / "model.safetensors").exists()
                       else "0 bytes")
  expected = [f"note: removed an unfinished write left by an interrupted run "
              f"(pid {proc.pid}): {tmp_path / n} ({size(n)})" for n in orphans]
  with atomic_dir(tmp_path / "hf") as tmp:
    (tmp / "config.json").write_text("{}")
  with atomic_path(tmp_path / "x.npy") as tmp:
    tmp.write_bytes(b"new")
  assert capsys.readouterr().out.splitlines() == expected
  assert sorted(os.listdir(tmp_path)) == sorted(["hf", "x.npy", *others])
  assert (tmp_path / "x.npy").read_bytes() == b"new"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs procfs")
def test_a_running_writers_partials_are_kept(tmp_path, capsys):
  proc = _writer(tmp_path, "wait")
  first, second, file = _partials(tmp_path)
  if not (tmp_path / first / "model.safetensors").exists():
    first, second = second, first  # first: the one holding 5,000 bytes
  try:
    # This process writes the same targets meanwhile, twice over (its own
    # unfinished write is live too); the other writer's partials stay.
    with atomic_dir(tmp_path / "hf") as mine:
      with atomic_dir(tmp_path / "hf") as inner:
        (inner / "a").write_text("inner")
      assert mine.is_dir()
    with atomic_path(tmp_path / "x.npy") as tmp:
      tmp.write_bytes(b"new")
    assert set(_partials(tmp_path)) == {first, second, file}
    assert capsys.readouterr().out == ""
    # Its pid with another start time is another process: the writer named
    # has ended, and its pid was reused.
    pid, start, host = re.fullmatch(_OWNED, first).groups()
    reused = f".hf.partial-{pid}-{int(start) + 1}-0badf00d@{host}"
    (tmp_path / first).rename(tmp_path / reused)
    # Written elsewhere (a shared file system) or by an earlier version:
    # no one here can tell whether its writer runs, so it stays, named.
    elsewhere = f".hf.partial-{pid}-{start}-0badf00d@elsewhere-0000"
    (tmp_path / elsewhere).mkdir()
    (tmp_path / ".hf.partial-0badf00d").mkdir()
    reclaim_unfinished(tmp_path / "hf")
    out = capsys.readouterr().out.splitlines()
    assert out == [  # In the order of their names.
        f"note: {tmp_path}/.hf.partial-0badf00d (0 bytes) is an unfinished "
        "write of hf by an earlier version; remove it if that run has ended",
        f"note: {tmp_path / elsewhere} (0 bytes) is an unfinished write of hf by pid {pid} on host "
        "elsewhere; remove it if that run has ended",
        f"note: removed an unfinished write left by an interrupted run (pid "
        f"{pid}): {tmp_path / reused} (4.9 KiB)"]
    assert set(_partials(tmp_path)) == {second, file, elsewhere}
    # Killed, not yet reaped (a zombie): gone all the same.
    proc.kill()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    reclaim_unfinished(tmp_path / "hf")
    reclaim_unfinished(tmp_path / "x.npy", file=True)
    assert _partials(tmp_path) == [elsewhere]
  finally:
    proc.kill()
    proc.wait()


def test_a_target_set_aside_by_a_killed_writer_comes_back(tmp_path, capsys):
  proc = _writer(tmp_path, "kill")
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text("previous")
  start, host = re.fullmatch(_OWNED, _partials(tmp_path)[0]).groups()[1:]
  # Killed between setting the previous hf aside and renaming the new one
  # into its place.
  aside = tmp_path / f".hf.old-{proc.pid}-{start}-0badf00d@{host}"
  (tmp_path / "hf").rename(aside)
  reclaim_unfinished(tmp_path / "hf")
  assert (tmp_path / "hf" / "config.json").read_text() == "previous"
  assert f"note: restored {tmp_path / 'hf'}, which an interrupted run (pid " \
         f"{proc.pid}) had set aside to replace it" in capsys.readouterr().out
  # Killed after the new one took its place: the old one goes.
  (tmp_path / "hf").rename(aside)
  shutil.copytree(aside, tmp_path / "hf")
  reclaim_unfinished(tmp_path / "hf")
  assert not aside.exists() and (tmp_path / "hf" / "config.json").exists()


def _command(module, *args):
  """`python -m module args`, started; on one CPU device, output unbuffered
  (what a killed process printed is kept)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.Popen(
      [sys.executable, "-m", module, *map(str, args)], cwd=ROOT, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      env={**env, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  """A run of the demo's model, two steps (the demo's own directory, not
  "demo", so that no report follows)."""
  from longlora_jax.checkpoints.hub import BUILTIN
  directory = tmp_path_factory.mktemp("demo_run")
  words = "the grass is green the sky is blue here we go there".split()
  rng = np.random.default_rng(0)
  (directory / "docs.jsonl").write_text("".join(
      json.dumps({"text": " ".join(rng.choice(words, 200))}) + "\n"
      for _ in range(40)))
  proc = _command("train.extend", "--ckpt", BUILTIN["demo"], "--ctx", "512",
                  "--data", directory / "docs.jsonl", "--steps", "2",
                  "--batch", "1", "--accum", "1", "--out", directory / "run")
  output = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, output
  return directory / "run"


def test_exports_killed_half_way_leave_nothing_after_the_next(demo_run,
                                                              tmp_path):
  from transformers import AutoConfig
  out = tmp_path / "export"
  weights = (demo_run / "hf" / "model.safetensors").stat().st_size

  def written(partial):
    try:
      return (partial / "model.safetensors").stat().st_size
    except OSError:
      return 0
  # Killed as soon as its partial directory appears, and once a third and
  # two thirds of the weights are in it; the three at once, to one --out.
  moments = {"appeared": lambda partial: True,
             "a third": lambda partial: written(partial) >= weights / 3,
             "two thirds": lambda partial: written(partial) >= weights * 2 / 3}
  exports = {name: _command("train.export", "--run", demo_run, "--out", out)
             for name in moments}
  killed, at_kill = {}, {}
  try:
    while len(killed) < len(moments) and not out.exists():
      for name, proc in exports.items():
        partials = list(tmp_path.glob(f".export.partial-{proc.pid}-*"))
        if name not in killed and partials and moments[name](partials[0]):
          at_kill[name] = written(partials[0])
          proc.kill()
          killed[name] = partials[0]
        assert name in killed or proc.poll() is None, proc.communicate()[0]
      time.sleep(0.001)
  finally:
    for proc in exports.values():
      proc.kill()
    outputs = {name: proc.communicate(timeout=60)[0]
               for name, proc in exports.items()}
  assert set(killed) == set(moments) and not out.exists(), outputs
  assert weights / 3 <= at_kill["a third"] < weights  # Killed half way.
  final = _command("train.export", "--run", demo_run, "--out", out)
  output = final.communicate(timeout=300)[0]
  assert final.returncode == 0, output
  # Each partial went, and said so, at the next write after its kill (the
  # last one killed, at the final export's).
  removed = re.compile(r"note: removed an unfinished write left by an "
                       r"interrupted run \(pid (\d+)\): (\S+) \(.+\)")
  lines = [m.groups() for text in [*outputs.values(), output]
           for m in map(removed.fullmatch, text.splitlines()) if m]
  assert sorted(path for _, path in lines) == sorted(map(str, killed.values()))
  assert all(pid == re.search(r"partial-(\d+)-", path)[1]
             for pid, path in lines)
  assert removed.search(output)
  assert [n for n in os.listdir(tmp_path) if n != "export"] == []
  config = lambda path: {k: v for k, v in AutoConfig.from_pretrained(
      path).to_dict().items() if k != "_name_or_path"}
  assert config(out) == config(demo_run / "hf")
  assert (out / "model.safetensors").read_bytes() == (
      demo_run / "hf" / "model.safetensors").read_bytes()


def test_a_lock_holder_reclaims_every_unfinished_write_in_its_directory(
    tmp_path, capsys):
  # Under a run's lock nothing else writes there: a running pid's partial
  # (this test's), an earlier version's name and a set-aside target all go,
  # the set-aside one back to its name; other hidden files stay.
  live = files._sibling(tmp_path / "hf", "partial")
  live.mkdir()
  (tmp_path / ".peft.partial-0badf00d").mkdir()
  (tmp_path / "model.gguf").write_bytes(b"new")
  gguf = files._sibling(tmp_path / "model.gguf", "partial", ".gguf")
  gguf.write_bytes(b"half")
  old = files._sibling(tmp_path / "peft", "old")
  old.mkdir()
  (old / "adapter_config.json").write_text("{}")
  (tmp_path / ".keep").write_text("mine")
  files.reclaim_all_unfinished(tmp_path, owned=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      ".keep", "model.gguf", "peft"]
  assert (tmp_path / "peft" / "adapter_config.json").exists()
  out = capsys.readouterr().out
  assert out.count("note: removed an unfinished write") == 3
  assert "note: restored" in out
  # Without the lock, a running writer's partial is kept.
  live.mkdir()
  files.reclaim_all_unfinished(tmp_path)
  assert live.exists()


def test_read_json_names_what_is_wrong(tmp_path):
  good = tmp_path / "config.json"
  good.write_text('{"a": [1, 2]}')
  assert files.read_json(good, missing="unused") == {"a": [1, 2]}
  with pytest.raises(LongLoraError, match="^nothing here; download it$"):
    files.read_json(tmp_path / "absent.json", missing="nothing here; download it")
  bad = tmp_path / "bad.json"
  bad.write_text('{"a": [1,\n 2')
  with pytest.raises(LongLoraError, match=re.escape(f"{bad}: not valid JSON (")
                     + ".*line 2 column 3"):
    files.read_json(bad, missing="unused")
  (tmp_path / "latin1.json").write_bytes(b'{"a": "\xe9"}')
  with pytest.raises(LongLoraError, match="not valid JSON"):
    files.read_json(tmp_path / "latin1.json", missing="unused")
