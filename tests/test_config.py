import json

import jax
import pytest
import transformers

from longlora_jax import CheckpointError, LlamaConfig, init_params, preset
from longlora_jax.config import RopeScaling
from tests.references.hf_models import TINY_CONFIGS


def _hf_dict(**kwargs):
  return transformers.LlamaConfig(**kwargs).to_dict()


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_reads_transformers_configs(name):
  kwargs = TINY_CONFIGS[name]
  hf = transformers.LlamaConfig(**kwargs)
  cfg = LlamaConfig.from_hf_dict(hf.to_dict())
  assert cfg.hidden_size == hf.hidden_size
  assert cfg.num_key_value_heads == hf.num_key_value_heads
  assert cfg.head_dim == hf.head_dim
  assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
  assert cfg.tie_word_embeddings == hf.tie_word_embeddings
  factor = hf.rope_parameters.get("factor")
  assert cfg.rope_factor == (factor or 1.0)


def test_both_rope_spellings():
  base = dict(model_type="llama", vocab_size=10, hidden_size=8,
              intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
  v4 = LlamaConfig.from_hf_dict(
      {**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear",
                                                    "factor": 8.0}})
  v4b = LlamaConfig.from_hf_dict(
      {**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "linear",
                                                    "factor": 8}})
  v5 = LlamaConfig.from_hf_dict(
      {**base, "rope_parameters": {"rope_type": "linear", "factor": 8.0,
                                   "rope_theta": 5e5}})
  assert v4 == v4b == v5
  assert v5.rope_scaling == RopeScaling(8.0) and v5.rope_theta == 5e5
  plain = LlamaConfig.from_hf_dict(
      {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
  assert plain.rope_scaling is None and plain.rope_factor == 1.0


def test_to_hf_dict_is_read_back_by_transformers(tmp_path):
  cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rope_theta=5e5,
                    rope_scaling=RopeScaling(4.0), max_position_embeddings=256)
  cfg.save(tmp_path)
  hf = transformers.LlamaConfig.from_pretrained(tmp_path)
  assert hf.rope_parameters["rope_type"] == "linear"
  assert hf.rope_parameters["factor"] == 4.0
  assert hf.rope_parameters["rope_theta"] == 5e5
  assert hf.num_key_value_heads == 2 and hf.max_position_embeddings == 256
  # transformers 4.x reads these two keys.
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["rope_scaling"]["type"] == "linear"
  assert saved["rope_theta"] == 5e5
  assert LlamaConfig.from_pretrained(tmp_path) == cfg


def test_with_context_uses_ceil_factor():
  cfg = LlamaConfig(max_position_embeddings=4096)
  assert cfg.with_context(100000).rope_factor == 25.0  # ceil(24.4)
  assert cfg.with_context(8192).rope_factor == 2.0
  assert cfg.with_context(8193).rope_factor == 3.0
  assert cfg.with_context(4096).rope_scaling is None
  assert cfg.with_context(8192).max_position_embeddings == 4096


def _num_params(cfg):
  shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
  return sum(x.size for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name,expected", [
    ("llama2-7b", 6_738_415_616),
    ("llama2-13b", 13_015_864_320),
    ("llama2-70b", 68_976_648_192),
])
def test_presets_have_published_parameter_counts(name, expected):
  assert _num_params(preset(name)) == expected


def test_presets_shapes():
  c70 = preset("llama2-70b")
  assert (c70.num_key_value_heads, c70.head_dim, c70.num_hidden_layers) == (8, 128, 80)
  with pytest.raises(CheckpointError, match="unknown model preset"):
    preset("llama2-8b")


@pytest.mark.parametrize("patch,message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "only Llama"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope type 'yarn'"),
    ({"rope_scaling": {"type": "linear"}}, "needs a factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"num_key_value_heads": 3}, "not a multiple"),
])
def test_bad_configs(patch, message):
  d = {**_hf_dict(vocab_size=10, hidden_size=8, intermediate_size=8,
                  num_hidden_layers=1, num_attention_heads=2), **patch}
  if "rope_scaling" in patch:
    d.pop("rope_parameters")
  with pytest.raises(CheckpointError, match=message):
    LlamaConfig.from_hf_dict(d)


def test_missing_keys_named():
  with pytest.raises(CheckpointError, match="hidden_size"):
    LlamaConfig.from_hf_dict({"model_type": "llama", "vocab_size": 10})
