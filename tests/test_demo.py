import json

from transformers import AutoTokenizer

from longlora_jax import LlamaConfig
from longlora_jax.demo import DEMO_CONFIG, demo_checkpoint


def test_demo_checkpoint_is_a_loadable_hf_model(tmp_path):
  directory = demo_checkpoint(tmp_path / "demo")
  assert LlamaConfig.from_pretrained(directory) == DEMO_CONFIG
  tok = AutoTokenizer.from_pretrained(directory)
  text = "naïve café, 100% ✓"
  ids = tok(text)["input_ids"]
  assert ids[0] == DEMO_CONFIG.bos_token_id
  assert len(ids) == 1 + len(text.encode("utf-8"))  # One token per byte.
  assert tok.decode(ids, skip_special_tokens=True) == text
  assert len(tok) == DEMO_CONFIG.vocab_size
  # Built once, then reused.
  stamp = (directory / "model.safetensors").stat().st_mtime_ns
  assert demo_checkpoint(tmp_path / "demo") == directory
  assert (directory / "model.safetensors").stat().st_mtime_ns == stamp
  assert json.loads((directory / "config.json").read_text())["vocab_size"] == 259
