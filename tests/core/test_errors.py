"""The errors' contract: a user error is one line and exit status 2; any
other exception is a bug and keeps its traceback."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _command(raise_: str) -> subprocess.CompletedProcess:
  code = textwrap.dedent(f"""
      from longlora_jax.core import cli, errors
      def main():
        raise {raise_}
      cli.run(main)
  """)
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("error", ["LongLoraError", "CheckpointError"])
def test_a_user_error_is_one_line_and_status_2(error):
  out = _command(f"errors.{error}('x.json: not found; pass a directory')")
  assert out.returncode == 2
  assert out.stderr == "error: x.json: not found; pass a directory\n"
  assert out.stdout == ""


def test_a_bug_keeps_its_traceback():
  out = _command("KeyError('layer')")
  assert out.returncode == 1
  assert "Traceback" in out.stderr and "KeyError: 'layer'" in out.stderr
