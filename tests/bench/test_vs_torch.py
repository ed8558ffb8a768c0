"""bench.vs_torch at tiny sizes, and its PyTorch side's S²-Attn (the
official `forward_noflashattn`, tests/references/longlora_torch.py) against
ours and the float64 reference. No timings are checked."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from longlora_jax.attention.dispatch import s2_attention
from tests.conftest import ROOT
from tests.references import attention as ref
from tests.references import hf_models

TINY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--intermediate",
        "128", "--vocab", "256", "--train-lengths", "64", "--prefill-lengths",
        "48", "--decode-prompt", "40", "--new-tokens", "6", "--pairs", "1"]


def _run(args, cwd):
  # One CPU device, as a user runs it (the suite's 8 virtual ones would
  # only slow the subprocesses down).
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": ""}
  return subprocess.run([sys.executable, "-m", "bench.vs_torch", *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=900)


def _torch_s2(q, k, v, w):
  """The official S²-Attn's output and gradients of sum(output * w), in
  our `[batch, seq, heads, head_dim]` layout."""
  from tests.references.hf_models import torch
  from tests.references.longlora_torch import s2_attention as official
  leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
  # Copies: it shifts its inputs in place.
  out, _ = official(None, *(x.transpose(1, 2).clone() for x in leaves))
  (out * torch.tensor(w)).sum().backward()
  return out.detach().numpy(), [x.grad.numpy() for x in leaves]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_official_s2_is_ours_roll_variant(heads, kv_heads):
  hf_models.require("torch", "peft")
  rng = np.random.default_rng(heads)
  q, k, v = (x.astype(np.float32) for x in ref.random_qkv(
      rng, 2, 32, heads, kv_heads, 16))
  w = rng.standard_normal(q.shape).astype(np.float32)
  out, grads = _torch_s2(q, k, v, w)
  # Against the float64 reference: groups of seq/4, the second half of the
  # heads rolled by G/2 with the last group wrapping around.
  mask = ref.mask_from_keys(ref.s2_head_keys(32, 8, heads, "roll"), batch=2)
  want, want_grads = ref.attention(q, k, v, mask, dout=w)
  ref.assert_close(out, want, relative=1e-5)
  for got, expected in zip(grads, want_grads):
    ref.assert_close(got, expected, relative=1e-5)
  ours, our_grads = ref.value_and_grads(
      s2_attention, (("variant", "roll"),), q, k, v, w)
  ref.assert_close(ours, out, relative=1e-5)
  for got, expected in zip(our_grads, grads):
    ref.assert_close(got, expected, relative=1e-5)
  # Our default ("flash") does not wrap around: it differs exactly there,
  # in the shifted heads' first G/2 tokens.
  flash = np.asarray(s2_attention(q, k, v, variant="flash"))
  differs = np.abs(flash - out).max(axis=(0, 3)) > 1e-4
  assert differs[:4, heads // 2:].all() and not differs[4:].any()
  assert not differs[:, :heads // 2].any()


def test_runs_every_workload_side_by_side(tmp_path):
  hf_models.require("torch", "peft")
  out = tmp_path / "vs.json"
  result = _run([*TINY, "--variant", "roll", "--cpus", "1",
                 "--json", str(out)], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  rows = {r["workload"]: r for r in report["results"]}
  assert [(r["workload"], r["tokens"]) for r in report["results"]] == [
      ("s2_step", 64), ("full_step", 64), ("attention", 64), ("prefill", 48),
      ("decode", 40)]
  for row in rows.values():
    assert row["ours_s"]["median"] > 0 and row["theirs_s"]["median"] > 0
    assert row["ratio"]["min"] <= row["ratio"]["median"] <= \
        row["ratio"]["max"]
  table = result.stdout.splitlines()
  for title in ("S² train step", "full train step", "attention", "prefill",
                "decode"):
    assert sum(line.startswith(title) for line in table) == 1, result.stdout
  for name in ("s2_step", "full_step"):
    # The same recipe on both sides: the same trained parameters, and with
    # LoRA a no-op at step 0 the same first loss (S²: the roll variant).
    row = rows[name]
    assert row["trained"]["ours"] == row["trained"]["theirs"]
    np.testing.assert_allclose(row["loss"]["ours"], row["loss"]["theirs"],
                               rtol=2e-6)
  assert rows["s2_step"]["loss"]["ours"] != rows["full_step"]["loss"]["ours"]
  # Attention alone: sum(output * w) of the same q, k, v and w.
  np.testing.assert_allclose(rows["attention"]["loss"]["ours"],
                             rows["attention"]["loss"]["theirs"], rtol=1e-4)
  for name, new in (("prefill", 1), ("decode", 6)):
    assert rows[name]["tokens_equal"] is True
    assert len(rows[name]["ours_tokens"]) == new
    assert rows[name]["ours_tokens"] == rows[name]["theirs_tokens"]
  assert rows["decode"]["ours_tok_s"] > 0
  assert report["versions"]["jax"] and report["versions"]["torch"]
  assert report["torch_threads"] == report["cpus"] == 1


@pytest.mark.parametrize("args,message", [
    (["--train-lengths", "100"], "--train-lengths 100: S²-Attn needs a "
                                 "multiple of 8"),
    (["--pairs", "0"], "argument --pairs: '0' is not an integer >= 1"),
    (["--new-tokens", "x"], "argument --new-tokens: 'x' is not an integer "
                            ">= 2"),
    (["--hidden", "60", "--heads", "8"], "--hidden 60 must split"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
  result = _run(args, tmp_path)
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith("error: " + message), result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
