"""Independent references for tests: tiny random Llama models made and saved
by transformers (PyTorch, CPU), and their logits.

PyTorch and PEFT are optional (the CI leg on the newest JAX has no CPU
PyTorch wheel): `torch` and `peft` are None without them, and a test that
needs them skips through `require`.
"""

import importlib

import numpy as np
import pytest
import transformers


def _optional(name):
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError:
    return None


torch = _optional("torch")
peft = _optional("peft")


def require(*names):
  """Skips the calling test unless each module in `names` is installed."""
  for name in names:
    pytest.importorskip(name, reason=f"needs {name} (the PyTorch reference)")

# Tiny configurations covering what Llama-family checkpoints vary.
TINY_CONFIGS = {
    "mha": dict(vocab_size=128, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4),
    "gqa": dict(vocab_size=128, hidden_size=64, intermediate_size=96,
                num_hidden_layers=3, num_attention_heads=8,
                num_key_value_heads=2),
    "pi4": dict(vocab_size=128, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=32, rope_theta=500000.0,
                rope_scaling={"type": "linear", "factor": 4.0}),
    # Odd vocab, head_dim 20 not derived from hidden/heads, one kv head,
    # tied embeddings and a padding token.
    "odd_tied": dict(vocab_size=97, hidden_size=72, intermediate_size=80,
                     num_hidden_layers=2, num_attention_heads=3,
                     num_key_value_heads=1, head_dim=20,
                     tie_word_embeddings=True, rms_norm_eps=1e-6,
                     pad_token_id=0, rope_theta=2500.0),
}


# Tiny models of each supported family and RoPE type (`model_type` picks
# the transformers class; Llama without it). Original contexts of 16-32
# tokens, so that tests run below and above them.
FAMILY_CONFIGS = {
    "llama3_1": dict(vocab_size=128, hidden_size=64, intermediate_size=96,
                     num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64,
                     rope_parameters={
                         "rope_type": "llama3", "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16,
                         "rope_theta": 500000.0}),
    "llama_yarn_bias": dict(vocab_size=128, hidden_size=64,
                            intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, head_dim=24,
                            attention_bias=True, max_position_embeddings=32,
                            rope_parameters={
                                "rope_type": "yarn", "factor": 4.0,
                                "original_max_position_embeddings": 32,
                                "rope_theta": 10000.0}),
    "llama_dynamic": dict(vocab_size=128, hidden_size=64,
                          intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=32,
                          rope_parameters={"rope_type": "dynamic",
                                           "factor": 2.0,
                                           "rope_theta": 10000.0}),
    # SmolLM2-135M's head layout: 9 query heads over 3 kv heads.
    "llama_9_heads": dict(vocab_size=128, hidden_size=72,
                          intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=9, num_key_value_heads=3,
                          tie_word_embeddings=True,
                          max_position_embeddings=32),
    "mistral": dict(model_type="mistral", vocab_size=128, hidden_size=64,
                    intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2,
                    sliding_window=None, max_position_embeddings=32,
                    rope_theta=1000000.0),
    "qwen2_yarn": dict(model_type="qwen2", vocab_size=128, hidden_size=64,
                       intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2,
                       # layer 0 global, layer 1 within 16 tokens
                       head_dim=16, use_sliding_window=True,
                       sliding_window=16, max_window_layers=1,
                       max_position_embeddings=32, rms_norm_eps=1e-6,
                       rope_parameters={
                           "rope_type": "yarn", "factor": 4.0,
                           "original_max_position_embeddings": 32,
                           "rope_theta": 1000000.0}),
    "qwen3": dict(model_type="qwen3", vocab_size=128, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  tie_word_embeddings=True, use_sliding_window=False,
                  max_position_embeddings=32, rope_theta=1000000.0),
    # Norms after attention and MLP; q/k norms over whole projections.
    "olmo2": dict(model_type="olmo2", vocab_size=128, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=32, rms_norm_eps=1e-6,
                  pad_token_id=1, bos_token_id=None, eos_token_id=2),
    # Fused qkv_proj and gate_up_proj; a window of 8 on every layer.
    "phi3": dict(model_type="phi3", vocab_size=128, hidden_size=64,
                 intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=32,
                 original_max_position_embeddings=32, sliding_window=8,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # Local (window 8) and global layers; caps small enough to bite; a
    # query_pre_attn_scalar other than head_dim.
    "gemma2": dict(model_type="gemma2", vocab_size=128, hidden_size=64,
                   intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   query_pre_attn_scalar=24, sliding_window=8,
                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                   max_position_embeddings=32, pad_token_id=0,
                   eos_token_id=1, bos_token_id=2),
    # q/k norms per head; local layers (window 8, RoPE base 10k) around a
    # global one (base 1M, linear x4), as layer_types say.
    "gemma3_text": dict(model_type="gemma3_text", vocab_size=128,
                        hidden_size=64, intermediate_size=96,
                        num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16,
                        query_pre_attn_scalar=24, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention",
                                     "sliding_attention"],
                        rope_parameters={
                            "sliding_attention": {"rope_type": "default",
                                                  "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "linear",
                                               "factor": 4.0,
                                               "rope_theta": 1000000.0}},
                        max_position_embeddings=32, pad_token_id=0,
                        eos_token_id=1, bos_token_id=2),
}


def make_hf_llama(kwargs: dict, seed: int = 0) -> "transformers.PreTrainedModel":
  """A float32 transformers model of `kwargs`' family (`model_type`,
  default Llama) with weights large enough to matter.

  transformers' own init (std 0.02) gives near-uniform logits, which would
  let a wrong model pass a tolerance test; so matrices get std 0.2 and norm
  weights and biases U(0.5, 1.5).
  """
  require("torch")
  torch.manual_seed(seed)
  kwargs = dict(kwargs)
  config = transformers.AutoConfig.for_model(
      kwargs.pop("model_type", "llama"), **kwargs)
  model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.2)
  return model


def save_hf_llama(directory, kwargs: dict, seed: int = 0, **save_kwargs):
  model = make_hf_llama(kwargs, seed)
  model.save_pretrained(directory, **save_kwargs)
  return model


def rope_parameters(params: dict) -> dict:
  """A transformers config's RoPE parameters without what is unset (per
  layer type, each), nor the 4.x spelling's "type" transformers keeps
  beside "rope_type"."""
  return {k: rope_parameters(v) if isinstance(v, dict) else v
          for k, v in params.items() if v is not None and k != "type"}


def hf_logits(model, input_ids: np.ndarray) -> np.ndarray:
  require("torch")
  with torch.no_grad():
    return model(torch.tensor(np.asarray(input_ids))).logits.float().numpy()


def random_ids(vocab_size: int, batch: int, seq: int, seed: int = 0):
  return np.random.default_rng(seed).integers(0, vocab_size, (batch, seq))
