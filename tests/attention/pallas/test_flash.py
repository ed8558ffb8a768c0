"""The kernels' online softmax, run outside a kernel over key blocks,
against float64 softmax attention (the bodies themselves run through the
Pallas interpreter in `test_grouped` and `test_cached`)."""

import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax.attention.pallas import flash

pytestmark = pytest.mark.skipif(not flash.AVAILABLE,
                                reason="Pallas Triton not importable")


def test_online_softmax_over_key_blocks_is_softmax():
  # 24 queries over 3 key blocks of 16; query t sees keys [t, t + 20], so
  # queries 16-23 see nothing in the first block (their row starts at MASK
  # there and must come out exact).
  rng = np.random.default_rng(0)
  T, S, H, block = 24, 48, 8, 16
  s_TS = rng.standard_normal((T, S)) * 4  # base-2 scores
  v_SH = rng.standard_normal((S, H))
  t, k = np.arange(T)[:, None], np.arange(S)[None, :]
  visible_TS = (k >= t) & (k <= t + 20)
  assert not visible_TS[16:, :block].any()
  carry = flash.softmax_init(T, H)
  for j in range(S // block):
    keys = slice(j * block, (j + 1) * block)
    scores = np.where(visible_TS[:, keys], s_TS[:, keys], flash.MASK)
    carry = flash.softmax_step(carry, jnp.asarray(scores, jnp.float32),
                               jnp.asarray(v_SH[keys], jnp.float32))
  acc_TH, m_T, l_T = (np.asarray(x, np.float64) for x in carry)
  p_TS = np.where(visible_TS, 2.0 ** s_TS, 0.0)
  want_TH = p_TS @ v_SH / p_TS.sum(1, keepdims=True)
  np.testing.assert_allclose(acc_TH / l_T[:, None], want_TH, atol=1e-5)
  # lse in base 2, as the backward kernels read it.
  np.testing.assert_allclose(m_T + np.log2(l_T), np.log2(p_TS.sum(1)),
                             atol=1e-5)


def test_mask_vanishes_once_rescaled():
  # Finite, so MASK - MASK is 0, not NaN; and exp2 of it past any real
  # running max is exactly 0 in float32.
  assert np.isfinite(flash.MASK)
  assert float(jnp.exp2(jnp.float32(flash.MASK) - jnp.float32(-1e4))) == 0.0
  np.testing.assert_allclose(flash.LOG2E, 1 / np.log(2), rtol=1e-15)
