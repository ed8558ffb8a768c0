"""bench.comm on XLA:CPU's fake devices, small shapes: the table's
bytes are what the attention must move (counted by hand)."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_bench_comm_counts_the_halo_and_the_gather(tmp_path):
  out = tmp_path / "comm.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  env.pop("XLA_FLAGS", None)
  run = subprocess.run(
      [sys.executable, "-m", "bench.comm", "--target", "cpu", "--ctx",
       "1024", "--group", "256", "--heads", "2", "--head-dim", "16",
       "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "XLA:CPU" in run.stdout and "| full | 1,024 | 8 |" in run.stdout
  rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
  mib = lambda tokens, heads: tokens * heads * 16 * 4 / 2**20  # f32 on CPU
  # Slices of 128 tokens, G = 256: the unshifted half (1 head) needs the
  # halo of 128 tokens before odd slices, the shifted one before even
  # slices: k and v of 128 tokens of 1 head each, forward and backward,
  # and the int32 ids of those tokens (forward only).
  assert rows["s2 flash"]["by_kind"] == {
      "collective-permute": 2 * 2 * 2 * mib(128, 1) + 2 * 128 * 4 / 2**20}
  # Full attention: k, v gathered (1024 tokens of 2 heads), their
  # gradients reduce-scattered.
  assert rows["full"]["by_kind"] == {"all-gather": 2 * mib(1024, 2),
                                     "reduce-scatter": 2 * mib(1024, 2)}
