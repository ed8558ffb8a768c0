import json
import math
import os
import subprocess
import sys

from eval.gpu_check import DEFAULT_SECTIONS, SECTIONS, failures, summarize
from tests.conftest import ROOT


def _smoke(tmp_path, sections):
  # Tiny sizes on the CPU, the Pallas kernel through its interpreter and
  # the cuDNN grouping through XLA: what a GPU box runs, section by section.
  env = {**os.environ, "PYTHONPATH": ROOT}
  proc = subprocess.run(
      [sys.executable, "-m", "eval.gpu_check", "--smoke", "--budget", "1500",
       "--out", str(tmp_path), "--sections", *sections], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=1600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads((tmp_path / "gpu_check.json").read_text())
  assert {k: v["status"] for k, v in report["sections"].items()} == \
      dict.fromkeys(sections, "ok")
  summary = (tmp_path / "gpu_check.md").read_text()
  assert summary.endswith("correctness: all checks passed\n")
  return report["sections"], summary


def test_smoke_run_checks_every_default_section(tmp_path):
  assert DEFAULT_SECTIONS == ["env", "correctness", "train_pallas",
                              "train_cudnn", "bench", "sweep", "plan",
                              "train_offload"]
  sections, summary = _smoke(tmp_path, DEFAULT_SECTIONS)
  checks = sections["correctness"]["checks"]
  assert len(checks) == 16 and {c["status"] for c in checks} == {"pass"}
  assert {c["name"].split("_")[0] for c in checks} == {"pallas", "cudnn"}
  assert all(max(c["rel_err"].values()) < 2e-2 for c in checks)
  assert all(d["compiled"] == d["expected"] == "xla"
             for d in sections["correctness"]["dispatch"].values())
  runs = sections["train_pallas"]["runs"] + sections["train_cudnn"]["runs"]
  assert [r["implementation"] for r in runs] == ["pallas_interpret", "dense"]
  # The same model and data: the fused kernel trains like the dense path.
  assert abs(runs[0]["losses"][0] - runs[1]["losses"][0]) < 1e-2
  assert {c["method"] for c in sections["bench"]["results"]} == {
      "pallas", "s2_dense", "dense"}
  assert sections["sweep"]["configs"][0]["max_rel_err_vs_default"] == 0
  assert sections["plan"]["per_device_gib"]["total"] > 0
  # The step with the layer inputs, masters and moments in host memory is
  # the same step.
  offloaded, kept = sections["train_offload"]["runs"]
  assert (offloaded["offload"], kept["offload"]) == ("activations,optimizer",
                                                     "none")
  assert offloaded["losses"] == kept["losses"]
  assert "| pallas_7b_bfloat16_flash | pass |" in summary


def test_smoke_run_checks_the_sections_run_on_request(tmp_path):
  on_request = [s for s in SECTIONS if s not in DEFAULT_SECTIONS]
  assert on_request == ["train_7b", "generate_7b", "train_7b_offload",
                        "sweep_wide"]
  sections, summary = _smoke(tmp_path, on_request)
  # The whole model's step with "auto" attention, and offloaded: the same
  # model and data, so the same losses.
  whole, = sections["train_7b"]["runs"]
  whole_offloaded, = sections["train_7b_offload"]["runs"]
  assert (whole["implementation"], whole_offloaded["offload"]) == (
      "auto", "activations")
  assert whole["losses"] == whole_offloaded["losses"]
  assert all(math.isfinite(x) for x in whole["losses"])
  prompt, = sections["generate_7b"]["results"]
  assert prompt["prompt"] == 256 and prompt["decode_tok_s"] > 0
  # Each kernel's configurations give its default's values and gradients.
  wide = sections["sweep_wide"]["configs"]
  assert [c["kernel"] for c in wide] == ["s2"] * 3 + ["window"] * (
      1 + bool(sections["sweep_wide"]["best"]))
  assert all(c["max_rel_err_vs_default"] < 1e-4 for c in wide)
  assert "| auto | 2 | activations | 256 |" in summary
  assert "| generation, prompt |" in summary and "| 256 | " in summary
  assert "| {'block_q_dkv': 16} | s2 |" in summary


def test_a_failed_check_fails_the_command():
  report = {"smoke": False, "sections": {
      "correctness": {"status": "ok", "checks": [
          {"name": "pallas_7b_bfloat16_flash", "status": "pass",
           "rel_err": {"out": 1e-3}},
          {"name": "cudnn_7b_bfloat16_flash", "status": "FAIL",
           "rel_err": {"out": 0.5}}],
          "dispatch": {"h128_bfloat16": {"compiled": "xla",
                                         "expected": "pallas"}}},
      "train_cudnn": {"status": "ok", "runs": [dict(
          implementation="cudnn", ctx=8192, finite=False, tokens_per_s=1.0,
          mfu=None, step_s=1.0, peak_gib=1.0, planned_gib=1.0,
          compile_s=1.0)]},
      "bench": {"status": "timeout after 120 s"}}}
  assert failures(report) == [
      "cudnn_7b_bfloat16_flash",
      "auto h128_bfloat16: compiled xla, expected pallas",
      "cudnn train loss at ctx 8192"]
  summary = summarize(report)
  assert "bench timeout after 120 s" in summary
  assert summary.endswith("correctness: FAILED: cudnn_7b_bfloat16_flash, "
                          "auto h128_bfloat16: compiled xla, expected "
                          "pallas, cudnn train loss at ctx 8192\n")
  no_correctness = {"smoke": True, "sections": {"env": {"status": "ok"}}}
  assert failures(no_correctness) == []
