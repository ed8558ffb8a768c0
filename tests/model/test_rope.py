import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax.model.config import LlamaConfig, RopeScaling
from longlora_jax.model.rope import apply_rope, rope_frequencies
from tests.references import hf_models


def _rope(x, positions, theta, factor=1.0):
  """Linear PI through the config, as the model applies it."""
  config = LlamaConfig(hidden_size=x.shape[-1] * 2, num_attention_heads=2,
                       rope_theta=theta, rope_scaling=RopeScaling(factor)
                       if factor > 1 else None)
  return apply_rope(x, positions, *rope_frequencies(config, positions))


def _rope_reference(x, positions, theta, factor):
  """Float64, one 2-D rotation per (i, i + d/2) pair, written out by hand."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  d = x.shape[-1]
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      for i in range(d // 2):
        angle = (positions[b, t] / factor) * theta ** (-2.0 * i / d)
        c, s = np.cos(angle), np.sin(angle)
        x1, x2 = x[b, t, :, i], x[b, t, :, i + d // 2]
        out[b, t, :, i] = x1 * c - x2 * s
        out[b, t, :, i + d // 2] = x2 * c + x1 * s
  return out


@pytest.mark.parametrize("theta,factor", [(10000.0, 1.0), (500000.0, 4.0),
                                          (10000.0, 25.0)])
def test_matches_float64_rotation(theta, factor):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 3, 8)).astype(np.float32)
  positions = np.stack([np.arange(7), np.arange(100, 107) * 13])
  got = _rope(jnp.asarray(x), jnp.asarray(positions), theta, factor)
  np.testing.assert_allclose(got, _rope_reference(x, positions, theta, factor),
                             atol=2e-5)


def test_interpolation_is_position_division():
  # PI: position p with factor f is the unscaled rotation at p / f.
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 4, 2, 16)), jnp.float32)
  p = jnp.asarray([[0, 4, 8, 12]])
  scaled = _rope(x, p, 10000.0, 4.0)
  plain = _rope(x, p // 4, 10000.0)
  np.testing.assert_allclose(scaled, plain, atol=1e-6)
  assert not np.allclose(scaled, _rope(x, p, 10000.0), atol=1e-2)


def test_keeps_dtype_and_norm():
  x = jnp.ones((1, 3, 2, 8), jnp.bfloat16)
  y = _rope(x, jnp.arange(3)[None], 10000.0)
  assert y.dtype == jnp.bfloat16
  # A rotation preserves each pair's norm.
  np.testing.assert_allclose(
      np.linalg.norm(np.asarray(y, np.float32), axis=-1), np.sqrt(8), rtol=1e-2)


# Every type against transformers' own init functions (PyTorch), for the
# sequence lengths a call may have: below and above the original context.
TYPES = {
    "default": None,
    "linear": RopeScaling(4.0),
    "dynamic": RopeScaling(4.0, "dynamic"),
    "yarn": RopeScaling(4.0, "yarn", original_max_position_embeddings=64),
    "yarn_mscale": RopeScaling(8.0, "yarn", original_max_position_embeddings=32,
                               beta_fast=16.0, beta_slow=2.0, mscale=0.7,
                               mscale_all_dim=0.5, truncate=False),
    "llama3": RopeScaling(8.0, "llama3", original_max_position_embeddings=32,
                          low_freq_factor=1.0, high_freq_factor=4.0),
}


@pytest.mark.parametrize("seq", [16, 64, 300])
@pytest.mark.parametrize("name", sorted(TYPES))
def test_frequencies_equal_transformers(name, seq):
  hf_models.require("torch")
  import torch
  import transformers
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  config = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_theta=5e5,
                       rope_scaling=TYPES[name], max_position_embeddings=64)
  hf = transformers.LlamaConfig(**{
      k: v for k, v in config.to_hf_dict().items() if k != "rope_scaling"})
  kind = config.rope_type
  if kind == "default":
    want = 1.0 / (5e5 ** (torch.arange(0, 128, 2).float() / 128)), 1.0
  elif kind == "dynamic":
    # The rotary module recomputes for the call's length past the original.
    want = ROPE_INIT_FUNCTIONS[kind](hf, None, seq_len=torch.tensor(seq))
  else:
    want = ROPE_INIT_FUNCTIONS[kind](hf, None)
  positions = jnp.arange(seq)[None]
  inv_freq, scale = rope_frequencies(config, positions)
  np.testing.assert_allclose(inv_freq, want[0].numpy(), rtol=1e-6, atol=0)
  assert scale == pytest.approx(want[1], rel=1e-7)
  if kind in ("yarn", "llama3", "dynamic") and seq > 64:
    assert not np.allclose(inv_freq, rope_frequencies(
        LlamaConfig(hidden_size=256, num_attention_heads=2, rope_theta=5e5),
        positions)[0])
