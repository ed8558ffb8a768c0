"""Rotary position embedding with linear position interpolation.

Matches transformers' "default" and "linear" rope types: the inverse
frequencies are divided by the interpolation factor, which is the same as
dividing the positions by it (Chen et al., 2023, "position interpolation").
"""

import jax.numpy as jnp


def rope_angles(positions_BT, head_dim: int, theta: float, factor: float = 1.0):
  """Rotation angles, float32 `[batch, seq, head_dim // 2]` (h: half of H)."""
  exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = (1.0 / (theta ** exponent)) / factor
  return positions_BT.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x_BTNH, positions_BT, *, theta: float, factor: float = 1.0):
  """Rotates `[batch, seq, heads, head_dim]` by position, "rotate_half" layout.

  Dimension i is paired with i + head_dim/2 (the HF Llama layout, not the
  interleaved one of the original Meta checkpoints). The rotation runs in
  float32 and is cast back to the input dtype.
  """
  angles_BTh = rope_angles(positions_BT, x_BTNH.shape[-1], theta, factor)
  cos = jnp.cos(angles_BTh)[:, :, None, :]
  sin = jnp.sin(angles_BTh)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  return rotated.astype(x_BTNH.dtype)
