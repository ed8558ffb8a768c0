"""Rotary position embedding with every RoPE scaling type of the supported
families, computed as transformers computes it (`modeling_rope_utils`).

Each type changes the inverse frequencies and, for yarn, scales cos and sin
by an attention factor:

  default  1 / theta^(2i/H)
  linear   divided by the factor: position interpolation (LongLoRA's PI)
  dynamic  NTK-aware: theta grows with the sequence, from the largest
           position + 1 of the call (transformers keeps the largest length
           it has seen in a stateful module; a fresh one matches this)
  yarn     interpolation and extrapolation blended per frequency by a ramp
           between the beta_fast and beta_slow rotations, and cos/sin times
           0.1 * ln(factor) + 1 (or the attention_factor given)
  llama3   Llama 3.1: low frequencies divided by the factor, high ones
           kept, a smooth blend between
"""

import math

import jax.numpy as jnp


def rope_frequencies(config, positions_BT):
  """(inverse frequencies float32 `[head_dim // 2]`, cos/sin scale) of
  `config` (a `LlamaConfig`) for a call at these positions."""
  dim, base, s = config.head_dim, config.rope_theta, config.rope_scaling
  exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  inv_freq = 1.0 / (base ** exponents)
  kind = config.rope_type
  if kind == "default":
    return inv_freq, 1.0
  if kind == "linear":
    return inv_freq / s.factor, 1.0
  if kind == "dynamic":
    original = config.max_position_embeddings
    seq = jnp.maximum(jnp.max(positions_BT) + 1, original)
    base = base * ((s.factor * seq / original) - (s.factor - 1)) ** (
        dim / (dim - 2))
    return 1.0 / (base ** exponents), 1.0
  if kind == "llama3":
    return _llama3(inv_freq, s), 1.0
  return _yarn(dim, base, s)


def _llama3(inv_freq, s):
  old = s.original_max_position_embeddings
  low_wavelen = old / s.low_freq_factor
  high_wavelen = old / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (old / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def _yarn(dim, base, s):
  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention_factor = s.attention_factor
  if attention_factor is None:
    attention_factor = (mscale(s.factor, s.mscale)
                        / mscale(s.factor, s.mscale_all_dim)
                        if s.mscale and s.mscale_all_dim else mscale(s.factor))

  def correction_dim(rotations):
    return (dim * math.log(s.original_max_position_embeddings
                           / (rotations * 2 * math.pi))) / (2 * math.log(base))

  low, high = correction_dim(s.beta_fast or 32), correction_dim(s.beta_slow or 1)
  if s.truncate is None or s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001  # as transformers: no zero-width ramp
  pos_freqs = base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low)
                  / (high - low), 0, 1)
  extrapolation = 1 - ramp
  inv_freq = ((1.0 / (s.factor * pos_freqs)) * (1 - extrapolation)
              + (1.0 / pos_freqs) * extrapolation)
  return inv_freq, float(attention_factor)


def apply_rope(x_BTNH, positions_BT, inv_freq_h, scale: float = 1.0):
  """Rotates `[batch, seq, heads, head_dim]` by position, "rotate_half" layout.

  Dimension i is paired with i + head_dim/2 (the HF layout, not the
  interleaved one of the original Meta checkpoints); cos and sin are scaled
  by `scale` (yarn's attention factor). The rotation runs in float32 and is
  cast back to the input dtype. `inv_freq_h`, `scale`: `rope_frequencies`.
  """
  angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq_h
  cos = (jnp.cos(angles_BTh) * scale)[:, :, None, :]
  sin = (jnp.sin(angles_BTh) * scale)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  return rotated.astype(x_BTNH.dtype)
