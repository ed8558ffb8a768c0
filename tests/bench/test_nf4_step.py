"""bench.nf4_step on a tiny config given as a config.json: the table has
both rows, the 4-bit row's frozen weights are smaller and its first loss
is the bf16 row's up to the quantization error; user errors are one line.
(That the 4-bit step is the step of its dequantized model exactly is
tests/training/test_step.py's.)"""

import json
import math

import pytest

from bench import nf4_step
from longlora_jax.core.errors import LongLoraError
from longlora_jax.model.config import LlamaConfig

TINY = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=64, tie_word_embeddings=False)


@pytest.fixture
def config_file(tmp_path):
  file = tmp_path / "config.json"
  file.write_text(json.dumps(TINY.to_hf_dict()))
  return str(file)


def test_both_rows_are_timed_and_their_losses_agree(config_file, tmp_path,
                                                     capsys):
  out = tmp_path / "nf4.json"
  nf4_step.main(["--model", config_file, "--layers", "2", "--ctx", "64",
                 "--repeats", "2", "--json", str(out)])
  printed = capsys.readouterr().out
  assert "| bf16 |" in printed and "| nf4 |" in printed
  result = json.loads(out.read_text())
  bf16, nf4 = result["rows"]
  assert (bf16["frozen"], nf4["frozen"]) == ("bf16", "nf4")
  assert (result["layers"], result["ctx"]) == (2, 64)
  for row in result["rows"]:
    assert len(row["step_s"]) == 2 and row["step_s_min"] > 0
    assert math.isfinite(row["loss"])
  # Random weights: the loss at step 0 is about ln(vocab), the same for
  # both up to NF4's rounding of the layer kernels.
  assert bf16["loss"] == pytest.approx(math.log(TINY.vocab_size), rel=0.05)
  assert nf4["loss"] == pytest.approx(bf16["loss"], rel=1e-2)
  assert nf4["loss"] != bf16["loss"]  # the 4-bit row did quantize
  # Layer kernels: 2 x 2*64*64 + ... in bf16 against 4 bits and scales;
  # embeddings (trained, not frozen) are in neither, the LM head in both.
  assert nf4["frozen_weights_gib"] < bf16["frozen_weights_gib"]
  assert result["ratio_nf4_bf16"] == pytest.approx(
      nf4["step_s_median"] / bf16["step_s_median"])


@pytest.mark.parametrize("argv,words", [
    (["--layers", "4"], "use --layers 3 or fewer"),
    (["--ctx", "60"], "multiple of 8"),
])
def test_user_errors_name_the_fix(config_file, argv, words):
  with pytest.raises(LongLoraError, match=words):
    nf4_step.main(["--model", config_file, *argv])
