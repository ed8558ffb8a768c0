import os
import subprocess
import sys

import pytest

from longlora_jax.checkpoints.hub import resolve_checkpoint
from tests.conftest import ROOT



def _run(args, cwd):
  env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
  return subprocess.run([sys.executable, "-m", "eval.score", *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=300)


def test_scores_demo_checkpoint(tmp_path):
  text = "import os\n\n\ndef main():\n    return os.path.join('a', 'b')\n"
  result = _run(["--text", text], tmp_path)
  assert result.returncode == 0, result.stderr
  lines = dict(line.split(None, 1) for line in result.stdout.splitlines()
               if line.strip())
  # BOS + the prepended space + one token per byte.
  assert lines["tokens"] == str(2 + len(text))
  # The demo model is pretrained on Python source: far below the 259 of a
  # uniform guess over its vocabulary.
  assert float(lines["perplexity"]) < 12, result.stdout
  # The default --ckpt: the built-in model, read where the package keeps
  # it; nothing is written.
  assert lines["checkpoint"] == str(resolve_checkpoint("demo"))
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ckpt,message", [
    ("/does/not/exist", "error: /does/not/exist: no such directory"),
    ("hf:nobody/nothing", "error: hf:nobody/nothing is not in the local Hugging Face cache"),
])
def test_user_errors_are_one_line(tmp_path, ckpt, message):
  result = _run(["--ckpt", ckpt], tmp_path)
  assert result.returncode == 2
  assert result.stderr.startswith(message)
  assert "Traceback" not in result.stderr
