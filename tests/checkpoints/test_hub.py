import json

from transformers import AutoTokenizer

import pytest

from longlora_jax import LlamaConfig, LongLoraError
from longlora_jax.checkpoints import hub
from longlora_jax.demo.base import DEMO_CONFIG


def test_demo_checkpoint_is_a_loadable_hf_model():
  directory = hub.resolve_checkpoint("demo")
  assert LlamaConfig.from_pretrained(directory) == DEMO_CONFIG
  tok = AutoTokenizer.from_pretrained(directory)
  text = "naïve café, 100% ✓"
  ids = tok(text)["input_ids"]
  assert ids[0] == DEMO_CONFIG.bos_token_id
  # BOS, then one token per byte of the text with a space prepended (as
  # Llama's tokenizer does), so " 12345" inside a prompt tokenises as alone.
  assert len(ids) == 2 + len(text.encode("utf-8"))
  assert ids[2:] == tok(" " + text)["input_ids"][3:]
  assert tok.decode(ids, skip_special_tokens=True) == text
  assert len(tok) == DEMO_CONFIG.vocab_size
  # Read in place from the package data.
  assert directory == hub.BUILTIN["demo"]
  assert json.loads((directory / "config.json").read_text())["vocab_size"] == 259


def test_missing_asset_names_the_rebuild_command(tmp_path, monkeypatch):
  monkeypatch.setitem(hub.BUILTIN, "demo", tmp_path / "nothing")
  with pytest.raises(LongLoraError, match="python -m train.pretrain_demo"):
    hub.resolve_checkpoint("demo")

