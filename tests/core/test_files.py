import errno
import os

import numpy as np
import pytest

from longlora_jax.core.errors import LongLoraError
from longlora_jax.core.files import (atomic_dir, atomic_path, check_writable,
                                   os_errno, output_error, write_json)


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
