"""Check a GPU box: versions, the fused S²-Attn paths against references,
train steps of a 7B-shaped model, the attention benchmark, a tile sweep and
the compile-only memory plan of the same step. On request, the whole 7B:
its train step at 32k and 100k tokens and offloaded at 200k, generation
after a 100k prompt, and a wide sweep of the Pallas kernels' tiles.

  python -m eval.gpu_check                  # a GPU box (times: BENCHMARKS.md)
  python -m eval.gpu_check --smoke          # anywhere: tiny sizes, interpreter
  python -m eval.gpu_check --sections train_7b generate_7b --budget 560

Writes OUT/gpu_check.json (every number) and OUT/gpu_check.md (a summary),
and exits 1 when a correctness check fails. Each section runs in its own
process under a time limit, so a crash or a hang costs that section only
and the allocator's peak is that section's; a section that no longer fits
the --budget is skipped, not cut short.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from longlora_jax.core import cli
from longlora_jax.core.files import check_writable, write_json, write_text

# Section -> (seconds it may take, seconds it needs to start), in the order
# they run: what matters most first (`bench.gpu_sections` holds them).
SECTIONS = {
    "env": (60, 10),
    "correctness": (200, 40),
    "train_pallas": (75, 40),
    "train_cudnn": (75, 40),
    "bench": (120, 45),
    "sweep": (60, 30),
    "plan": (45, 20),
    "train_offload": (75, 40),
    # On request only: each takes minutes.
    "train_7b": (360, 150),
    "generate_7b": (200, 90),
    "train_7b_offload": (300, 150),
    "sweep_wide": (330, 60),
}
DEFAULT_SECTIONS = list(SECTIONS)[:8]

def parse_args(argv=None):
  p = cli.Parser(__doc__)
  p.add_argument("--out", type=Path, default=Path("runs/gpu_check"),
                 help="directory for gpu_check.json and gpu_check.md")
  p.add_argument("--budget", type=cli.positive, default=470,
                 help="seconds for all sections")
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes on any backend, Pallas interpreter; the "
                 "sections' own time limits do not apply, only --budget")
  p.add_argument("--sections", nargs="+", choices=list(SECTIONS),
                 default=DEFAULT_SECTIONS,
                 help=f"default: {' '.join(DEFAULT_SECTIONS)}")
  p.add_argument("--section", help=argparse.SUPPRESS)  # child process
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.section:
    return _child(args)
  check_writable(args.out)
  args.out.mkdir(parents=True, exist_ok=True)
  start, report = time.time(), {"smoke": args.smoke, "sections": {}}
  for name in args.sections:
    limit, needs = SECTIONS[name]
    if args.smoke:  # The limits are a GPU's; a busy CPU takes what it takes.
      limit, needs = args.budget, 0
    left = args.budget - (time.time() - start)
    if left < needs:
      report["sections"][name] = {"status": f"skipped: {left:.0f} s left"}
      print(f"== {name}: skipped ({left:.0f} s left)", flush=True)
      continue
    print(f"== {name} (limit {min(limit, left):.0f} s)", flush=True)
    report["sections"][name] = _run_section(args, name, min(limit, left))
    report["seconds"] = round(time.time() - start, 1)
    write_json(args.out / "gpu_check.json", report)
  summary = summarize(report)
  write_text(args.out / "gpu_check.md", summary)
  print("\n" + summary)
  print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
  return 1 if failures(report) else 0


def _run_section(args, name: str, limit: float) -> dict:
  """The section in a child process; its JSON result, or what went wrong."""
  result_file = args.out / f".{name}.json"
  result_file.unlink(missing_ok=True)
  command = [sys.executable, "-m", "eval.gpu_check", "--section", name,
             "--out", str(args.out)] + ["--smoke"] * args.smoke
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  if args.smoke:
    env["JAX_PLATFORMS"] = "cpu"
  t0 = time.time()
  try:
    proc = subprocess.run(command, env=env, timeout=limit, text=True,
                          capture_output=True)
    status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    tail = proc.stderr[-1500:]
  except subprocess.TimeoutExpired as e:
    status, tail = f"timeout after {limit:.0f} s", str(e.stderr or "")[-1500:]
  result = json.loads(result_file.read_text()) if result_file.exists() else {}
  result_file.unlink(missing_ok=True)
  result.update(status=status, seconds=round(time.time() - t0, 1))
  if status != "ok":
    result["stderr_tail"] = tail
  print(f"   {status} in {result['seconds']} s", flush=True)
  return result


def _child(args) -> int:
  from bench import gpu_sections as sections
  save = lambda result: write_json(args.out / f".{args.section}.json", result)
  save(sections.SECTIONS[args.section](args.smoke, save))
  return 0


def failures(report: dict) -> list[str]:
  """What went wrong with the numbers: correctness checks that failed or
  raised (or a correctness section that did not finish; a check skipped
  for time is not a failure), "auto" compiling another implementation than
  it says it takes, non-finite train losses."""
  sections = report["sections"]
  correctness = sections.get("correctness", {"status": "ok"})
  bad = [c["name"] for c in correctness.get("checks", [])
         if c["status"] in ("FAIL", "ERROR")]
  if correctness.get("status") != "ok":
    bad.append(f"correctness section: {correctness.get('status')}")
  bad += [f"auto {case}: compiled {d['compiled']}, expected {d['expected']}"
          for case, d in correctness.get("dispatch", {}).items()
          if d["compiled"] != d["expected"]]
  bad += [f"{r['implementation']} train loss at ctx {r['ctx']}"
          for name, section in sections.items() if name.startswith("train")
          for r in section.get("runs", []) if not r["finite"]]
  return bad


def summarize(report: dict) -> str:
  """The markdown summary: one table per section."""
  s = report["sections"]
  env = s.get("env", {})
  lines = [f"# gpu_check{' (smoke)' * report['smoke']}", "",
           f"- device: {env.get('device_kind', '?')}, backend "
           f"{env.get('backend', '?')}, jax {env.get('jax', '?')}, "
           f"auto takes {env.get('auto', '?')}",
           "- sections: " + ", ".join(f"{k} {v.get('status')}"
                                       for k, v in s.items())]
  checks = s.get("correctness", {}).get("checks", [])
  if checks:
    lines += ["", "| check | status | max rel. error (out, dq, dk, dv) |",
              "| --- | --- | --- |"]
    for c in checks:
      errs = c.get("rel_err", {})
      lines.append(f"| {c['name']} | {c['status']} | "
                   + ", ".join(f"{errs[k]:.1e}" for k in errs) + " |")
  runs = [r for k, v in s.items() if k.startswith("train")
          for r in v.get("runs", [])]
  if runs:
    lines += ["", "| S² impl | layers | offload | ctx | tokens/s | MFU | "
              "step s | peak GiB | planned GiB | compile s |", "| --- | ---: "
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
      mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
      lines.append(
          f"| {r['implementation']} | {r.get('layers', '?')} | "
          f"{r.get('offload', 'none')} | {r['ctx']} | "
          f"{r['tokens_per_s']:,.0f} "
          f"| {mfu} | {r['step_s']:.3f} | {r['peak_gib']:.2f} | "
          f"{r['planned_gib']:.2f} | {r['compile_s']} |")
  bench = s.get("bench", {}).get("results", [])
  if bench:
    ms = lambda r, k: f"{1e3 * r[k]:.2f}" if r.get(k) else "-"
    lines += ["", "| attention | seq | fwd ms | fwd+bwd ms | temp MiB |",
              "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['method']} | {r['seq']} | {ms(r, 'fwd_time_s')} | "
              f"{ms(r, 'time_s')} | {(r.get('temp_bytes') or 0) / 2**20:.0f} |"
              for r in bench]
  generated = s.get("generate_7b", {}).get("results", [])
  if generated:
    gib = lambda x: "-" if x is None else f"{x:.2f}"
    lines += ["", "| generation, prompt | prefill s | prefill tok/s | "
              "decode tok/s | peak GiB |", "| ---: | ---: | ---: | ---: | "
              "---: |"]
    lines += [f"| {r['prompt']} | {r['prefill_s']:.2f} | "
              f"{r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:.2f} | "
              f"{gib(r.get('peak_gib'))} |" for r in generated]
  for name in ("sweep", "sweep_wide"):
    sweep = s.get(name, {}).get("configs", [])
    if sweep:
      lines += ["", f"| {name}: Pallas tiles (changed from the default) | "
                "kernel | fwd+bwd ms |", "| --- | --- | ---: |"]
      lines += [f"| {c['changes'] or 'default'} | {c.get('kernel', 's2')} | "
                + (f"{1e3 * c['time_s']:.2f} |" if c.get("time_s") else
                   f"{c.get('error', '-')[:80]} |") for c in sweep]
  plan = s.get("plan", {})
  if plan.get("per_device_gib"):
    lines += ["", f"- compile-only plan ({plan.get('compiler')}): "
              f"{plan['per_device_gib']['total']:.2f} GiB at ctx "
              f"{plan.get('ctx')}"]
  bad = failures(report)
  lines += ["", "correctness: " + ("FAILED: " + ", ".join(bad) if bad
                                   else "all checks passed")]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  cli.run(main)
