"""eval.ruler end to end on the tiny demo checkpoint, and its user errors."""

import json

import pytest

from eval import ruler
from longlora_jax.checkpoints.hub import resolve_checkpoint
from tests.conftest import run_commands


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  return resolve_checkpoint("demo")


def test_ruler_cli_writes_json_and_both_plots(demo, tmp_path, capsys):
  argv = ["--ckpt", str(demo), "--lengths", "0.75k", "1k", "--samples", "3",
          "--tasks", "niah_single_1", "niah_single_2", "vt", "qa_2",
          "--depths", "0", "50", "100", "--out", str(tmp_path),
          "--dtype", "float32"]
  ruler.main(argv)
  out = capsys.readouterr().out
  summary = json.loads((tmp_path / "ruler.json").read_text())
  scores = summary["scores"]
  # 0.75k = 768 tokens. The byte-level demo fits the needles at both
  # lengths; variable tracking's one-shot example fits at neither; QA has
  # no data: each with its note, none with a score.
  assert set(scores["niah_single_1"]) == {"768", "1024"}
  assert all(0 <= s <= 100 for s in scores["niah_single_2"].values())
  assert scores["vt"] == {"768": None, "1024": None}
  assert scores["qa_2"] == {}
  assert any("qa_2 needs hotpotqa" in n for n in summary["notes"])
  assert any("vt does not fit in 768" in n for n in summary["notes"])
  sample = json.loads((tmp_path / "samples" / "niah_single_2-1024.json")
                      .read_text())
  assert sample["metric"] == "string_match_all" and sample["length"] == 1024
  assert [s["depth"] for s in sample["samples"]] == [0, 50, 100]
  assert all(s["tokens"] <= 1024 - 128 for s in sample["samples"])
  for plot in ("scores.png", "depth.png"):
    assert (tmp_path / plot).stat().st_size > 5000
  assert "niah_single_1" in out and "wrote" in out
  # A rerun with the same settings reuses what was written.
  mtime = (tmp_path / "samples" / "niah_single_2-1024.json").stat().st_mtime
  ruler.main(argv)
  assert (tmp_path / "samples" / "niah_single_2-1024.json").stat(
  ).st_mtime == mtime
  assert json.loads((tmp_path / "ruler.json").read_text())["scores"] == scores


_USER_ERRORS = [
    # The types every command shares (longlora_jax.core.cli).
    (["--samples", "0"],
     "error: argument --samples: '0' is not an integer >= 1 (see --help)"),
    (["--lengths", "4x"], "error: argument --lengths: '4x' is not an integer "
                          ">= 64 (e.g. 4096 or 4k) (see --help)"),
    (["--lengths", "nan"], "error: argument --lengths: 'nan' is not an "
                           "integer >= 64"),
    (["--depths", "101"], "error: argument --depths: '101' is not a finite "
                          "number in [0, 100]"),
    (["--depths", "inf"], "error: argument --depths: 'inf' is not a finite "
                          "number in [0, 100]"),
    (["--haystack", "/nope"], "error: --haystack /nope: no such file"),
    (["--squad", "/nope.json"], "error: --squad /nope.json: cannot read it"),
]


def test_user_errors(demo):
  results = run_commands({
      str(i): ("eval.ruler", ["--ckpt", str(demo), *flags])
      for i, (flags, _) in enumerate(_USER_ERRORS)})
  for i, (flags, message) in enumerate(_USER_ERRORS):
    code, stderr = results[str(i)]
    assert code == 2, (flags, stderr)
    assert stderr.strip().splitlines()[-1].startswith(message), flags
    assert "Traceback" not in stderr, flags


def test_every_command_takes_a_trained_length():
  from eval import passkey, perplexity
  assert passkey.parse_args(["--ckpt", "x", "--max-tokens", "100000"]
                            ).max_tokens == 100000
  assert passkey.parse_args(["--ckpt", "x", "--max-tokens", "32k"]
                            ).max_tokens == 32768
  assert perplexity.parse_args(["--ckpt", "x", "--data", "d", "--seq-len",
                                "4k", "100000"]).seq_len == [4096, 100000]
  assert ruler.parse_args(["--ckpt", "x", "--lengths", "128k", "400000"]
                          ).lengths == [131072, 400000]
