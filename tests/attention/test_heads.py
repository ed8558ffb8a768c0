"""S²'s two halves of the query heads: which kv head each query head reads
after `even_halves`, by hand."""

import jax.numpy as jnp
import numpy as np

from longlora_jax.attention.heads import even_halves


def _qkv(N, K):
  """q, k, v `[1, 2, heads, 1]` whose head h holds h + 1 (q), 10 (h + 1)
  (k) and 100 (h + 1) (v)."""
  heads = lambda n, scale: jnp.broadcast_to(
      scale * (jnp.arange(n, dtype=jnp.float32) + 1)[None, None, :, None],
      (1, 2, n, 1))
  return heads(N, 1), heads(K, 10), heads(K, 100)


def _read(k):
  return np.asarray(k[0, 0, :, 0])


def test_even_heads_on_even_kv_heads_stay_as_they_are():
  q, k, v = _qkv(8, 2)
  out = even_halves(q, k, v)
  for got, want in zip(out, (q, k, v)):
    assert got is want


def test_odd_kv_heads_are_doubled():
  # 6 heads on 3: the middle kv head served both halves; doubled, query
  # heads 0-2 read kv heads 0-2 and 3-5 read 3-5, both as head h // 2 did.
  q, k, v = _qkv(6, 3)
  q2, k2, v2 = even_halves(q, k, v)
  assert q2 is q
  np.testing.assert_array_equal(_read(k2), [10, 10, 20, 20, 30, 30])
  np.testing.assert_array_equal(_read(v2), [100, 100, 200, 200, 300, 300])


def test_odd_heads_get_a_zero_head_in_the_shifted_half():
  # 9 heads on 3 (SmolLM2-135M): kv repeated per query head (h reads h // 3),
  # a zero head appended, so the halves are heads 0-4 and 5-9, the real
  # shifted heads 5-8 (the last floor(9 / 2)).
  q, k, v = _qkv(9, 3)
  q2, k2, v2 = even_halves(q, k, v)
  np.testing.assert_array_equal(_read(q2), [1, 2, 3, 4, 5, 6, 7, 8, 9, 0])
  np.testing.assert_array_equal(_read(k2),
                                [10, 10, 10, 20, 20, 20, 30, 30, 30, 0])
  np.testing.assert_array_equal(
      _read(v2), [100, 100, 100, 200, 200, 200, 300, 300, 300, 0])
