"""bench.ablation on a tiny model: two arms (one trained for two steps, one
untrained) write the results, the table and the plot; a second run reuses
them; the arms' trainable parameters on the demo's config against counts by
hand."""

import json

import jax
import numpy as np
import pytest

from bench import ablation
from longlora_jax.checkpoints.checkpoint import Checkpoint
from longlora_jax.checkpoints.hf import save_hf
from longlora_jax.core.errors import LongLoraError
from longlora_jax.demo.base import DEMO_CONFIG
from longlora_jax.model.config import LlamaConfig
from longlora_jax.model.llama import init_params
from longlora_jax.training import run as training_run

# Native context 32, extended 2x to 64: S²-Attn groups of 16.
TINY = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
                   pad_token_id=0, tie_word_embeddings=False)
WORDS = "the grass is green the sky is blue here we go there and back".split()


def _docs(path, n, seed):
  rng = np.random.default_rng(seed)
  path.write_text("".join(
      json.dumps({"text": " ".join(rng.choice(WORDS, 40))}) + "\n"
      for _ in range(n)))
  return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("ablation")
  model = save_hf(TINY, init_params(TINY, jax.random.key(0)), d / "model",
                  tokenizer_from=Checkpoint.open("demo").directory,
                  dtype="float32")
  # About 200 tokens a document: 600 held out, enough for two windows of
  # 64 256 tokens apart.
  return {"args": ["--ckpt", str(model), "--ctx", "64",
                   "--data", _docs(d / "train.jsonl", 20, 0),
                   "--heldout", _docs(d / "heldout.jsonl", 3, 1),
                   "--steps", "2", "--batch", "1", "--windows", "2",
                   "--arms", "s2_flash,pi", "--seeds", "0",
                   "--out", str(d / "out")], "out": d / "out"}


def test_two_arms_write_results_and_a_second_run_reuses_them(
    files, monkeypatch, capsys):
  ablation.main(files["args"])
  out = files["out"]
  result = json.loads((out / "ablation.json").read_text())
  assert [a["arm"] for a in result["arms"]] == ["s2_flash", "pi"]
  assert result["lengths"] == [32, 64]
  for run in result["runs"]:
    assert set(run["ppl"]) == {"32", "64"}
    assert all(np.isfinite(v) and v > 1 for v in run["ppl"].values())
    assert len(run["losses"]) == (0 if run["arm"] == "pi" else 2)
  trained, pi = result["runs"]
  assert trained["step_s"] > 0 and trained["rss_peak_mb"] > 0
  assert trained["tokens_per_s"] == pytest.approx(
      len(jax.devices()) * 64 / trained["step_s"])  # batch 1 per device
  # Two steps at the demo's learning rate moved the model away from the
  # untrained base with the same PI.
  assert trained["ppl"]["64"] != pi["ppl"]["64"]
  table = (out / "ablation.md").read_text().splitlines()
  assert table[0].startswith("| arm | trainable params |")
  # LoRA+ of the tiny model: 4 * 2 * 512 + 259 * 32 + 5 * 32.
  assert [line.split(" | ")[:2] for line in table[2:4]] == [
      ["| S²-Attn flash, LoRA+ (ours)", "12,544"], ["| PI, no training", "0"]]
  assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
  printed = capsys.readouterr().out
  assert printed.splitlines()[0] == table[0]

  # Again: every arm is finished, nothing trains, the same numbers.
  monkeypatch.setattr(training_run, "run", lambda *a, **k: pytest.fail(
      "a finished arm ran again"))
  ablation.main(files["args"])
  again = json.loads((out / "ablation.json").read_text())
  assert again["runs"] == result["runs"]
  assert "finished before, not run again" in capsys.readouterr().err
  # Other settings in the same directory are refused in one line.
  with pytest.raises(LongLoraError, match="run of other settings"):
    ablation.main([*files["args"], "--windows", "3"])


# Trainable parameters by hand. LoRA r=8 on q, k, v, o: d*8 + 8*d each.
# Embedding: vocab * d. Norms: 2 per layer and the final one, d each.
def _by_hand(config, mode):
  d, layers, v = config.hidden_size, config.num_hidden_layers, 259
  lora = 4 * layers * 2 * d * 8
  embed, norms = v * d, (2 * layers + 1) * d
  layer = 4 * d * d + 3 * d * config.intermediate_size + 2 * d
  return {"lora": lora, "lora+embed": lora + embed, "lora+norm": lora + norms,
          "lora+": lora + embed + norms,
          # Every weight, the untied output head too.
          "full": 2 * embed + layers * layer + d}[mode]


def test_trainable_parameters_of_each_arm():
  # The demo: LoRA+ 67,072 (32,768 + 33,152 + 1,152), full 857,984.
  assert _by_hand(DEMO_CONFIG, "lora+") == 67_072
  assert _by_hand(DEMO_CONFIG, "full") == 857_984
  args = ablation.parse_args([])
  args.ctx = 1024
  for arm, mode in {"s2_flash": "lora+", "lora_only": "lora",
                    "lora_embed": "lora+embed", "lora_norm": "lora+norm",
                    "full_ft": "full"}.items():
    options = ablation.recipe(args, ablation.BY_NAME[arm], seed=0)
    assert ablation.trainable_params(options, DEMO_CONFIG) == _by_hand(
        DEMO_CONFIG, mode), arm
