"""The evaluation commands end to end on the tiny demo checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval import chat, passkey, perplexity, ruler
from eval import pretokenize as tokenize
from longlora_jax.perf import gpu_target
from longlora_jax.checkpoints.hub import resolve_checkpoint
from tests.conftest import ROOT, run_commands



@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  return resolve_checkpoint("demo")


def test_passkey_cli(demo, tmp_path, capsys):
  passkey.main(["--ckpt", str(demo), "--max-tokens", "600", "--interval",
                "300", "--num-tests", "2", "--out", str(tmp_path),
                "--dtype", "float32"])
  result = json.loads((tmp_path / "passkey.json").read_text())
  rows = result["results"]
  # A byte-level tokenizer: the filler is measured, and the prompts are as
  # long as asked (within the digits of the trial's key).
  assert result["protocol"] == "measured"
  assert [abs(r["tokens"] - want) <= 2 for r, want in zip(rows, (300, 600))
          ] == [True, True]
  assert all(r["trials"] == 2 and 0 <= r["accuracy"] <= 1 for r in rows)
  assert (tmp_path / "passkey.png").stat().st_size > 1000
  assert "accuracy" in capsys.readouterr().out
  # The official schedule on demand: characters sized for Llama, so with
  # one token per byte each prompt is longer than its filler.
  passkey.main(["--ckpt", str(demo), "--max-tokens", "600", "--interval",
                "300", "--num-tests", "1", "--out", str(tmp_path / "o"),
                "--dtype", "float32", "--protocol", "official"])
  rows = json.loads((tmp_path / "o" / "passkey.json").read_text())["results"]
  assert [r["filler_chars"] for r in rows] == [1024, 2048]
  assert rows[0]["tokens"] > 1024 and rows[1]["tokens"] > 2048


def test_readme_passkey_command_is_the_printed_one_and_its_lengths(
    demo, tmp_path, capsys):
  # The demo run prints the command the README shows; run as shown, it
  # tests the lengths the README names, all within the trained 1024.
  from longlora_jax.checkpoints.checkpoint import Checkpoint
  from longlora_jax.evaluation.suggest import commands
  readme = (Path(ROOT) / "README.md").read_text()
  (line,) = [l for l in readme.splitlines()
             if l.startswith("python -m eval.passkey --ckpt runs/demo")]
  base = Checkpoint.open("demo")
  print(commands("long-context", Path("runs/demo/extend/hf"),
                 tokenizer=base.tokenizer, data="d", native=256, ctx=1024))
  assert f"  {line}\n" in capsys.readouterr().out
  args = line.split()[3:]
  args[args.index("--ckpt") + 1] = str(demo)
  passkey.main([*args, "--num-tests", "1", "--out", str(tmp_path)])
  tokens = [r["tokens"] for r in json.loads(
      (tmp_path / "passkey.json").read_text())["results"]]
  assert [abs(t - want) <= 2 for t, want in zip(tokens, (256, 512, 768, 1024))
          ] == [True] * 4 and len(tokens) == 4
  assert "256, 512, 768 and 1024 tokens" in readme


@pytest.mark.parametrize("command,defaults", [
    (passkey, ["--max-tokens MAX_TOKENS\n", "(default: 32000)",
               "(default: 1000)", "(default: runs/passkey)", "(default: 10)"]),
    (perplexity, ["(default: 2048 4096)", "(default: 256)",
                  "(default: runs/perplexity)", "(default: official)"]),
])
def test_help_shows_the_defaults(command, defaults, capsys):
  with pytest.raises(SystemExit):
    command.parse_args(["--help"])
  out = " ".join(capsys.readouterr().out.split())
  for default in defaults:
    assert " ".join(default.split()) in out, default


@pytest.mark.skipif(not gpu_target.AVAILABLE or os.path.exists(
    "/dev/nvidiactl"), reason="needs JAX's CUDA plugin and no NVIDIA GPU")
def test_no_cudnn_traceback_on_a_machine_without_a_gpu(demo):
  # As a user runs it: no JAX_PLATFORMS, the CUDA plugin installed.
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK")}
  result = subprocess.run(
      [sys.executable, "-m", "eval.score", "--ckpt", str(demo)], cwd=ROOT,
      capture_output=True, text=True, timeout=300,
      env={**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT})
  assert result.returncode == 0, result.stderr
  assert "cuDNN" not in result.stderr and "Traceback" not in result.stderr
  assert "perplexity" in result.stdout


def test_tokenize_then_perplexity_cli(demo, tmp_path, capsys):
  (tmp_path / "book.txt").write_text("All happy families are alike. " * 60)
  tokenize.main(["--tokenizer", str(demo), "--data", str(tmp_path / "book.txt"),
                 "--out", str(tmp_path / "book.bin")])
  # uint16 ids: BOS, the prepended space, one per byte.
  assert (tmp_path / "book.bin").stat().st_size == 2 * (2 + 30 * 60)
  score = lambda mesh: perplexity.main([
      "--ckpt", str(demo), "--data", str(tmp_path / "book.bin"),
      "--seq-len", "128", "256", "--stride", "256", "--attention", "full",
      "--out", str(tmp_path / mesh), "--dtype", "float32", "--mesh", mesh])
  score("fsdp=8")
  result = json.loads((tmp_path / "fsdp=8" / "perplexity.json").read_text())
  assert [r["seq_len"] for r in result["results"]] == [128, 256]
  # The pretrained demo model on a repeated sentence: far below the 259 of
  # a uniform guess.
  assert all(1 < r["perplexity"] < 30 for r in result["results"]), result
  assert (tmp_path / "fsdp=8" / "perplexity.png").exists()
  # Split 4-way fsdp, 2-way tensor instead of 8-way fsdp: the same.
  score("fsdp=4,tensor=2")
  sharded = json.loads((tmp_path / "fsdp=4,tensor=2" /
                        "perplexity.json").read_text())
  for one, eight in zip(result["results"], sharded["results"], strict=True):
    assert one["perplexity"] == pytest.approx(eight["perplexity"], rel=1e-5)


_USER_ERRORS = {
    "no_ckpt": (["eval.passkey", "--ckpt", "/nope"],
                "error: /nope: no such directory"),
    "no_data": (["eval.perplexity", "--ckpt", "DEMO", "--data", "/nope.bin"],
                "error: /nope.bin: no such file"),
    "short": (["eval.passkey", "--ckpt", "DEMO", "--interval", "100"],
              "error: --interval 100: a passkey prompt takes more than 248 "
              "tokens of this tokenizer; 100 is too short"),
    "no_filler": (["eval.passkey", "--ckpt", "DEMO", "--interval", "100",
                   "--protocol", "official"],
                  "error: --interval 100 gives prompts without filler"),
}


def test_user_errors(demo):
  results = run_commands({
      name: (args[0], [str(demo) if a == "DEMO" else a for a in args[1:]])
      for name, (args, _) in _USER_ERRORS.items()})
  for name, (_, message) in _USER_ERRORS.items():
    code, stderr = results[name]
    assert code == 2, (name, stderr)
    assert stderr.strip().splitlines()[-1].startswith(message), name
    assert "Traceback" not in stderr, name


@pytest.mark.parametrize("command,required", [
    (passkey, []), (perplexity, ["--data", "D"]), (ruler, []),
    (chat, ["--material", "M", "--question", "?"])])
def test_the_model_options_reach_the_arguments(command, required):
  # What main hands to load_model (checkpoint.load_model, tested in
  # tests/checkpoints/test_checkpoint.py).
  args = command.parse_args(["--ckpt", "C", *required])
  assert (args.ckpt, args.ctx, args.pi_factor, args.dtype, args.mesh) == (
      "C", None, None, "bfloat16", "fsdp=-1")
  args = command.parse_args(["--ckpt", "C", *required, "--ctx", "1000",
                             "--pi-factor", "6", "--dtype", "float32",
                             "--mesh", "fsdp=4,tensor=2"])
  assert (args.ckpt, args.ctx, args.pi_factor, args.dtype, args.mesh) == (
      "C", 1000, 6.0, "float32", "fsdp=4,tensor=2")
