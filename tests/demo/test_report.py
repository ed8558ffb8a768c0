"""The demo's report: its perplexities against transformers' (the official
protocol's first window is one forward pass), the rows it compares, and its
table, against hand-written text."""

import json
import math

import pytest

from longlora_jax.checkpoints import hub
from longlora_jax.checkpoints.checkpoint import Checkpoint
from longlora_jax.checkpoints.hf import save_hf
from longlora_jax.demo import report
from longlora_jax.evaluation.passkey import passkey_filler
from tests.references import hf_models
from tests.references.hf_models import torch  # None without PyTorch


def _hf_perplexities(ids, lengths, **rope):
  """exp(mean next-token loss) of the demo model on the first `lengths`
  tokens of `ids` (the official protocol's first window), in PyTorch."""
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(
      hub.BUILTIN["demo"], dtype=torch.float32, **rope).eval()
  with torch.no_grad():
    logits = model(torch.tensor([ids[:max(lengths)]])).logits[0]
  return {f"ppl@{n}": math.exp(torch.nn.functional.cross_entropy(
      logits[:n - 1], torch.tensor(ids[1:n])).item()) for n in lengths}


def test_report_measures_the_three_models(tmp_path, monkeypatch):
  hf_models.require("torch")
  # Two held-out documents, the byte tokenizer's 1 token a byte (plus the
  # prepended space and EOS each): enough for one window at 512.
  texts = [json.__doc__, report.__doc__ * 2]
  heldout = tmp_path / "heldout.jsonl"
  heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  monkeypatch.setattr(report, "demo_data", lambda: (None, heldout))
  tok = Checkpoint.open("demo").tokenizer
  ids = [i for t in texts for i in [*tok(t, add_special_tokens=False)[
      "input_ids"], 2]]
  assert len(ids) == sum(len((" " + t).encode()) + 1 for t in texts)
  # "Extended": the base model with PI x2 and no training, as an export.
  base = Checkpoint.open("demo")
  extended = save_hf(base.config.with_context(512), base.params("float32"),
                     tmp_path / "hf", tokenizer_from=base.directory,
                     dtype="float32")
  # Passkey retrieval (tested in tests/evaluation) stands in here: right
  # on the first trial of every third call.
  calls = []
  def retrieval(config, params, tokenizer, n_filler, trials):
    calls.append((config.rope_factor, n_filler, trials))
    return int(len(calls) % 3 == 1), n_filler // 2
  monkeypatch.setattr(report, "retrieval", retrieval)
  r = report.report(512, extended, windows=1, trials=2)
  assert (r["native"], r["ctx"], r["heldout_tokens"]) == (256, 512, len(ids))
  rows = r["rows"]
  assert [row["model"] for row in rows] == [
      "base model, no interpolation", "base + PI x2, no fine-tuning",
      "extended (LongLoRA, hf)"]
  assert [row["rope_factor"] for row in rows] == [1.0, 2.0, 2.0]
  pi = {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                            "rope_theta": 10000.0}}
  # Causal: a window's logits are the longer window's first ones.
  want = {0: _hf_perplexities(ids, (256, 512)),
          1: _hf_perplexities(ids, (256, 512), **pi)}
  want[2] = want[1]
  for i, row in enumerate(rows):
    for key, value in want[i].items():
      assert row[key] == pytest.approx(value, rel=1e-4), (i, key)
  # Each model at fillers sized for prompts just above the native context
  # and just below the trained one (16 tokens either side).
  fillers = [passkey_filler(tok, 256 + 16), passkey_filler(tok, 512 - 16)]
  assert calls == [(f, n, 2) for f in (1.0, 2.0, 2.0) for n in fillers]
  assert [(row["passkey0"], row["passkey1"]) for row in rows] == [
      ({"accuracy": a / 2, "prompt_tokens": n // 2}, {
          "accuracy": b / 2, "prompt_tokens": fillers[1] // 2})
      for a, b, n in [(1, 0, fillers[0]), (0, 1, fillers[0]),
                      (0, 0, fillers[0])]]


def test_the_table():
  rows = [{"model": name, "ppl@256": a, "ppl@1024": b,
           "passkey0": {"accuracy": c, "prompt_tokens": 272},
           "passkey1": {"accuracy": d, "prompt_tokens": 1007}}
          for name, a, b, c, d in [("base", 3.30549, 14.0781, 0.0, 0.25),
                                   ("extended (LongLoRA, hf)", 3.6, 4.69449,
                                    1.0, 0.05)]]
  text = report.format_report({"native": 256, "ctx": 1024, "windows": 24,
                               "heldout_tokens": 123456, "trials": 20,
                               "rows": rows})
  assert text.splitlines()[:4] == [
      "model                                  ppl@256  ppl@1024  "
      "passkey@~272  passkey@~1007",
      "-" * 85,
      "base                                     3.305    14.078            "
      "0%            25%",
      "extended (LongLoRA, hf)                  3.600     4.694          "
      "100%             5%"]
  assert text.splitlines()[4].startswith(
      "perplexity: official protocol, 24 windows per length over 123,456 "
      "held-out tokens")


def test_save_report_writes_what_it_prints(tmp_path, monkeypatch):
  row = {"model": "m", "ppl@256": 1.0, "ppl@1024": 2.0,
         "passkey0": {"accuracy": 0.0, "prompt_tokens": 270},
         "passkey1": {"accuracy": 0.0, "prompt_tokens": 1000}}
  r = {"native": 256, "ctx": 1024, "windows": 1, "heldout_tokens": 9,
       "trials": 1, "rows": [row]}
  monkeypatch.setattr(report, "report", lambda ctx, d: {**r, "ctx": ctx})
  text = report.save_report(tmp_path, 1024, tmp_path / "hf")
  assert json.loads((tmp_path / "report.json").read_text()) == r
  assert text.splitlines()[-1] == f"wrote {tmp_path / 'report.json'}"
  assert text.splitlines()[0].startswith("model ")
