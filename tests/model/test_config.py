import json

import jax
import pytest
import transformers

from longlora_jax import (CheckpointError, LlamaConfig, init_params,
                          preset)
from longlora_jax.model.config import RopeScaling
from tests.references import hf_models
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
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
     "model_type='gpt2'.*supported families: llama, mistral, qwen2, qwen3"),
    ({"model_type": "mixtral"}, "no MoE or multimodal"),
    ({"model_type": "gemma"}, "model_type='gemma'"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}},
     "rope type 'longrope' .Phi-3 128k. is not supported; extend the 4k"),
    ({"rope_scaling": {"type": "linear"}}, "needs a factor"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
     "needs low_freq_factor and high_freq_factor"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                          "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
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


@pytest.mark.parametrize("name", sorted(hf_models.FAMILY_CONFIGS))
def test_reads_and_writes_each_family_as_transformers_does(name):
  kwargs = dict(hf_models.FAMILY_CONFIGS[name])
  hf = transformers.AutoConfig.for_model(kwargs.pop("model_type", "llama"),
                                         **kwargs)
  cfg = LlamaConfig.from_hf_dict(hf.to_dict())
  assert cfg.model_type == hf.model_type
  assert cfg.head_dim == getattr(hf, "head_dim", None) or (
      hf.hidden_size // hf.num_attention_heads)  # OLMo 2 derives it
  assert cfg.qk_norm == (hf.model_type in ("qwen3", "olmo2", "gemma3_text"))
  assert cfg.qkv_bias == (hf.model_type == "qwen2"
                          or bool(getattr(hf, "attention_bias", False)))
  assert cfg.o_bias == bool(getattr(hf, "attention_bias", False))
  # (Gemma 3: per layer type; --ctx extends the global layers' RoPE.)
  assert cfg.rope_type == hf.rope_parameters.get(
      "full_attention", hf.rope_parameters)["rope_type"]
  back = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
  assert type(back) is type(hf)
  for key in ("hidden_size", "num_key_value_heads", "head_dim",
              "tie_word_embeddings", "max_position_embeddings",
              "sliding_window"):
    if hasattr(hf, key):  # (OLMo 2's config has no head_dim; we write it)
      assert getattr(back, key, None) == getattr(hf, key), key
  # (transformers keeps the 4.x spelling's "type" beside "rope_type".)
  rope = hf_models.rope_parameters
  assert rope(back.rope_parameters) == rope(hf.rope_parameters)
  assert LlamaConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_linear_scaling_keeps_the_format_transformers_4_34_validates():
  # transformers 4.34-4.42 (the official LongLoRA pins 4.34) refuse a
  # `rope_scaling` with other keys than `type` and `factor`.
  d = LlamaConfig(rope_scaling=RopeScaling(8.0)).to_hf_dict()
  assert d["rope_scaling"] == {"type": "linear", "factor": 8.0}
  llama3 = LlamaConfig(rope_scaling=RopeScaling(
      8.0, "llama3", original_max_position_embeddings=8192,
      low_freq_factor=1.0, high_freq_factor=4.0)).to_hf_dict()
  # 4.43's format (rope_type and every parameter), and 5.x's.
  assert llama3["rope_scaling"] == {
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  assert llama3["rope_parameters"] == {**llama3["rope_scaling"],
                                       "rope_theta": 10000.0}


def test_sliding_windows_are_read_per_layer_as_transformers_does():
  base = dict(vocab_size=10, hidden_size=8, intermediate_size=8,
              num_hidden_layers=3, num_attention_heads=2)
  cases = [
      dict(model_type="mistral", sliding_window=24),
      dict(model_type="qwen2", use_sliding_window=False, sliding_window=24),
      dict(model_type="qwen2", use_sliding_window=True, sliding_window=24,
           max_window_layers=1),
      dict(model_type="qwen3", use_sliding_window=True, sliding_window=24,
           layer_types=["sliding_attention", "full_attention",
                        "sliding_attention"]),
  ]
  for case in cases:
    d = {**base, **case}
    hf = transformers.AutoConfig.for_model(**d)
    cfg = LlamaConfig.from_hf_dict(d)
    want = getattr(hf, "layer_types", None) or (
        ["sliding_attention"] * 3 if hf.sliding_window else
        ["full_attention"] * 3)
    assert cfg.local_layers == tuple(t == "sliding_attention" for t in want)
    assert cfg.sliding_window == hf.sliding_window
    back = LlamaConfig.from_hf_dict(cfg.to_hf_dict())
    assert back.local_layers == cfg.local_layers
  with pytest.raises(CheckpointError, match="layer_types=.*'chunked_attention'"
                     ) as e:
    LlamaConfig.from_hf_dict({**base, **cases[3], "layer_types": [
        "chunked_attention"] * 3})
  assert "\n" not in str(e.value)


def test_extension_keeps_llama3_and_yarn_and_interpolates_the_rest():
  llama31 = preset("llama3.1-8b")
  assert (llama31.original_context, llama31.context) == (8192, 131072)
  x4 = llama31.with_context(400_000)  # ceil(400k / 131072) = 4
  assert (x4.rope_type, x4.rope_factor, x4.max_position_embeddings,
          x4.context) == ("llama3", 32.0, 524288, 524288)
  assert x4.rope_scaling.original_max_position_embeddings == 8192
  assert llama31.with_context(100_000) == llama31  # already long enough
  linear = llama31.with_context(400_000, "linear")
  assert (linear.rope_type, linear.rope_factor,
          linear.max_position_embeddings) == ("linear", 49.0, 8192)
  yarn = LlamaConfig(rope_scaling=RopeScaling(
      4.0, "yarn", original_max_position_embeddings=32768),
      max_position_embeddings=32768)
  assert yarn.context == 131072
  assert yarn.with_context(262144).rope_factor == 8.0
  assert yarn.with_context(262144).max_position_embeddings == 32768
  assert yarn.with_context(262144).context == 262144
  llama2 = preset("llama2-7b")
  assert llama2.with_context(100_000).rope_factor == 25.0
  assert llama2.with_context(100_000).rope_type == "linear"
  y = llama2.with_context(32768, "yarn")
  # max_position_embeddings stays the pretraining length, which
  # transformers 4.43-4.44 read as yarn's original context.
  assert (y.rope_type, y.rope_factor, y.max_position_embeddings,
          y.rope_scaling.original_max_position_embeddings, y.context) == (
              "yarn", 8.0, 4096, 4096, 32768)
  assert LlamaConfig(rope_scaling=RopeScaling(8.0)).context == 32768


def test_phi3_interpolation_is_written_as_the_longrope_transformers_reads():
  kwargs = dict(hf_models.FAMILY_CONFIGS["phi3"])
  cfg = LlamaConfig.from_hf_dict(kwargs).with_context(128)
  assert (cfg.rope_type, cfg.rope_factor) == ("linear", 4.0)
  d = cfg.to_hf_dict()
  hf = transformers.AutoConfig.for_model(**d)  # Phi-3 validates it
  assert hf.rope_parameters["short_factor"] == [4.0] * 8
  assert LlamaConfig.from_hf_dict(d) == cfg
  with pytest.raises(ValueError, match="--rope linear"):
    LlamaConfig.from_hf_dict(kwargs).with_context(128, rope="yarn")
  real = {**d, "rope_parameters": {**d["rope_parameters"],
                                   "long_factor": [4.0] * 7 + [5.0]}}
  with pytest.raises(CheckpointError, match="'longrope' .Phi-3 128k."):
    LlamaConfig.from_hf_dict(real)


@pytest.mark.parametrize("name", ["gemma2-9b", "gemma3-4b", "olmo2-7b",
                                  "phi3-mini"])
def test_family_presets_are_configs_transformers_reads(name):
  cfg = preset(name)
  hf = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
  assert hf.model_type == cfg.model_type
  assert getattr(hf, "sliding_window", None) == cfg.sliding_window
  if cfg.gemma:  # (Phi-3 windows every layer whatever its layer_types say)
    assert tuple(t == "sliding_attention" for t in hf.layer_types) == (
        cfg.local_layers)
