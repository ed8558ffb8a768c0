"""Which keys a query may see, by hand."""

import jax.numpy as jnp
import numpy as np

from longlora_jax.attention.masks import attention_mask, causal_mask


def test_causal_mask():
  np.testing.assert_array_equal(causal_mask(3), [[[1, 0, 0],
                                                  [1, 1, 0],
                                                  [1, 1, 1]]])


def test_causal_mask_keeps_documents_apart():
  seg = jnp.asarray([[0, 0, 1, 1], [5, 6, 6, 6]])
  np.testing.assert_array_equal(causal_mask(4, seg), [
      [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]],
      [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]]])


def test_queries_at_an_offset():
  # Two new queries at positions 2 and 3 over four keys (a cache).
  np.testing.assert_array_equal(
      attention_mask(jnp.asarray([2, 3]), jnp.arange(4)),
      [[[1, 1, 1, 0], [1, 1, 1, 1]]])
  np.testing.assert_array_equal(
      attention_mask(jnp.asarray([2, 3]), jnp.arange(4),
                     jnp.asarray([[1, 2]]), jnp.asarray([[1, 1, 2, 2]])),
      [[[1, 1, 0, 0], [0, 0, 1, 1]]])
