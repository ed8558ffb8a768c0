"""Query heads in S²-Attn's two halves, for the implementations that run
both halves as one batched attention (`s2`, `cudnn_grouped`): halves of equal
size whose query heads read their own kv heads in a uniform layout.

Any layout becomes one: an odd number of query heads N gets a zero head
appended (in the shifted half, whose real heads are then the last
floor(N/2), see `groups.shifted_heads`) with K/V repeated per query head
(memory for K/V grows Q-fold, only for odd N); an odd number of kv heads K
(so the middle kv head serves both halves) gets two copies of each (K/V
memory doubles). The Pallas kernel needs neither: it picks each query
head's groups and kv head by index.
"""

import jax.numpy as jnp


def even_halves(q_BTNH, k_BTKH, v_BTKH):
  """(q, k, v) with an even number of query heads split in two halves over
  disjoint, uniformly read kv heads; outputs past the input's N heads are
  padding to drop."""
  N, K = q_BTNH.shape[2], k_BTKH.shape[2]
  if N % 2:
    k_BTKH, v_BTKH = (jnp.repeat(x, N // K, axis=2) for x in (k_BTKH, v_BTKH))
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 0)))
    return pad(q_BTNH), pad(k_BTKH), pad(v_BTKH)
  if K % 2:
    k_BTKH, v_BTKH = (jnp.repeat(x, 2, axis=2) for x in (k_BTKH, v_BTKH))
  return q_BTNH, k_BTKH, v_BTKH
