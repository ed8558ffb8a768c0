"""python -m train.sft on a tiny model (8 virtual CPU devices)."""

import json

import numpy as np
import pytest

from longlora_jax import LongLoraError
from longlora_jax.demo.base import save_byte_tokenizer
from tests.references import hf_models
from train import extend, sft

# Native context 32; rows of 64 tokens train with RoPE x2.
TINY = dict(vocab_size=259, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)


def _records(n, seed=0):
  """Six random letters and the answer: them reversed. With the byte-level
  tokenizer each example is BOS + " " + "[INST]" 6 "[/INST]" (19 bytes)
  + 6 answer bytes + EOS = 28 tokens, 7 of them scored."""
  rng = np.random.default_rng(seed)
  words = ["".join(rng.choice(list("abcdefgh"), 6)) for _ in range(n)]
  return [{"instruction": w, "output": w[::-1]} for w in words]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("sft")
  hf_models.save_hf_llama(d / "model", TINY)
  save_byte_tokenizer(d / "model")
  data = d / "records.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in _records(200)))
  return {"model": d / "model", "data": data, "tmp": d}


def test_sft_trains_on_the_answers_only(files):
  out = files["tmp"] / "run"
  assert sft.main(["--ckpt", str(files["model"]), "--ctx", "64", "--data",
                   str(files["data"]), "--out", str(out), "--dtype",
                   "float32", "--lr", "1e-2", "--warmup", "2", "--accum", "1",
                   "--steps", "12", "--save-every", "6"]) == 0
  metrics = [json.loads(l) for l in (out / "metrics.jsonl").open()]
  # 8 rows a step (one per device), two 28-token examples a row (64 // 28),
  # 7 scored tokens each: the prompts and the padding score nothing.
  assert {m["tokens"] for m in metrics} == {8 * 2 * 7}
  losses = [m["loss"] for m in metrics]
  assert np.mean(losses[-3:]) < losses[0] - 1.0, losses
  spec = json.loads((out / "run.json").read_text())
  assert (spec["task"], spec["recipe"]["attention"]["kind"]) == ("sft", "s2")
  config = json.loads((out / "hf" / "config.json").read_text())
  assert config["rope_scaling"]["factor"] == 2.0
  assert (out / "peft" / "adapter_config.json").exists()

  # train.extend does not resume a fine-tuning run.
  with pytest.raises(LongLoraError, match="is a run of train.sft"):
    extend.main(["--resume", "--out", str(out)])


@pytest.mark.parametrize("records, message", [
    ([{"instruction": "a"}], "record 1 has no 'output' field"),
    ([], "no instruction records"),
])
def test_bad_records(files, records, message):
  data = files["tmp"] / f"bad{len(records)}.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in records))
  out = files["tmp"] / f"bad_out{len(records)}"
  with pytest.raises(LongLoraError, match=message):
    sft.main(["--ckpt", str(files["model"]), "--ctx", "64", "--data",
              str(data), "--out", str(out)])
  assert not out.exists()


def test_ckpt_is_required():
  with pytest.raises(LongLoraError, match="--ckpt is required"):
    sft.main(["--data", "x.jsonl", "--ctx", "64"])


def test_a_4bit_run_records_it_and_exports_the_dequantized_merge(files,
                                                                 capsys):
  """--quantize nf4: the run trains over NF4 kernels; the merged export
  holds, for a kernel LoRA+ leaves alone, bitsandbytes' dequantization of
  the base weight (float32, the run's dtype), and says the base was 4-bit."""
  F = pytest.importorskip("bitsandbytes.functional")
  import torch
  from safetensors.numpy import load_file
  out = files["tmp"] / "nf4"
  assert sft.main(["--ckpt", str(files["model"]), "--ctx", "64", "--data",
                   str(files["data"]), "--out", str(out), "--dtype",
                   "float32", "--accum", "1", "--steps", "1",
                   "--quantize", "nf4"]) == 0
  assert "base weights: 4-bit NF4" in capsys.readouterr().out
  assert json.loads((out / "run.json").read_text())["quantize"] == "nf4"
  name = "model.layers.1.mlp.up_proj.weight"
  w = load_file(files["model"] / "model.safetensors")[name]
  want = F.dequantize_4bit(*F.quantize_4bit(
      torch.from_numpy(w.astype(np.float32).reshape(-1)), blocksize=64,
      quant_type="nf4", compress_statistics=True)).numpy().reshape(w.shape)
  np.testing.assert_array_equal(
      load_file(out / "hf" / "model.safetensors")[name], want)
