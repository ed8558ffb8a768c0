import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax.model.modules import Dense, RMSNorm, rms_norm


def _float64_rms_norm(x, w, eps, offset=False):
  x = np.asarray(x, np.float64)
  normed = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
  return normed * ((1.0 + w) if offset else w)


@pytest.mark.parametrize("weight_f32", [False, True])
@pytest.mark.parametrize("offset", [False, True])
def test_rms_norm_against_float64(weight_f32, offset):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 16)) * 3
  w = rng.standard_normal(16)
  got = rms_norm(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                 1e-5, weight_f32, offset)
  np.testing.assert_allclose(got, _float64_rms_norm(x, w, 1e-5, offset),
                             rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("weight_f32", [False, True])
@pytest.mark.parametrize("offset", [False, True])
def test_weight_gradient_at_batch_one_is_one_reduction(weight_f32, offset):
  # d/dw sum(g * norm(x) * w) = sum over batch and tokens of g * normed,
  # taken by one reduction over both axes at once: a reduction over the
  # tokens alone (what `w * normed` gives at batch 1) is XLA:CPU's slow one.
  rng = np.random.default_rng(1)
  x, g = rng.standard_normal((2, 1, 7, 16))
  w = rng.standard_normal(16)
  loss = lambda w: jnp.sum(jnp.asarray(g, jnp.float32) * rms_norm(
      jnp.asarray(x, jnp.float32), w, 1e-5, weight_f32, offset))
  w32 = jnp.asarray(w, jnp.float32)
  normed = _float64_rms_norm(x, np.ones(16), 1e-5)
  np.testing.assert_allclose(jax.grad(loss)(w32), (g * normed).sum((0, 1)),
                             rtol=1e-5, atol=1e-5)
  sums = [e.params["axes"] for e in jax.make_jaxpr(jax.grad(loss))(w32).eqns
          if e.primitive.name == "reduce_sum"]
  assert (0, 1) in sums and (1,) not in sums, sums


def test_initial_values_follow_transformers():
  x = jnp.ones((1, 3, 4))
  norm = RMSNorm(1e-6, jnp.float32).init(jax.random.key(0), x)["params"]
  gemma = RMSNorm(1e-6, jnp.float32, offset=True).init(jax.random.key(0),
                                                       x)["params"]
  np.testing.assert_array_equal(norm["weight"], np.ones(4))
  np.testing.assert_array_equal(gemma["weight"], np.zeros(4))  # (1 + w)
  dense = Dense(6, jnp.float32, jnp.float32, 0.02, use_bias=True)
  params = dense.init(jax.random.key(0), x)["params"]
  assert params["kernel"].shape == (4, 6)  # [in, out], torch's transpose
  np.testing.assert_array_equal(params["bias"], np.zeros(6))
  np.testing.assert_allclose(dense.apply({"params": params}, x),
                             x @ params["kernel"], rtol=1e-6)
