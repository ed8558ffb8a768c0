import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax.rope import apply_rope


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
  got = apply_rope(jnp.asarray(x), jnp.asarray(positions), theta=theta,
                   factor=factor)
  np.testing.assert_allclose(got, _rope_reference(x, positions, theta, factor),
                             atol=2e-5)


def test_interpolation_is_position_division():
  # PI: position p with factor f is the unscaled rotation at p / f.
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 4, 2, 16)), jnp.float32)
  p = jnp.asarray([[0, 4, 8, 12]])
  scaled = apply_rope(x, p, theta=10000.0, factor=4.0)
  plain = apply_rope(x, p // 4, theta=10000.0)
  np.testing.assert_allclose(scaled, plain, atol=1e-6)
  assert not np.allclose(scaled, apply_rope(x, p, theta=10000.0), atol=1e-2)


def test_keeps_dtype_and_norm():
  x = jnp.ones((1, 3, 2, 8), jnp.bfloat16)
  y = apply_rope(x, jnp.arange(3)[None], theta=10000.0)
  assert y.dtype == jnp.bfloat16
  # A rotation preserves each pair's norm.
  np.testing.assert_allclose(
      np.linalg.norm(np.asarray(y, np.float32), axis=-1), np.sqrt(8), rtol=1e-2)
