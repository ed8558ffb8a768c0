import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax.attention.by_group import S2ByGroup
from longlora_jax.attention.dispatch import full_attention
from tests.references import attention as ref


def _by_group(variant, implementation="dense", ratio=0.25):
  return S2ByGroup(ratio, variant, functools.partial(
      full_attention, implementation=implementation))


def test_rows_by_hand():
  unshifted, shifted = _by_group("flash").rows(16)
  np.testing.assert_array_equal(unshifted, [[0, 1, 2, 3], [4, 5, 6, 7],
                                            [8, 9, 10, 11], [12, 13, 14, 15]])
  # Shifted by G/2 = 2; the last piece wraps to the sequence's start.
  np.testing.assert_array_equal(shifted, [[2, 3, 4, 5], [6, 7, 8, 9],
                                          [10, 11, 12, 13], [14, 15, 0, 1]])
  unshifted, shifted = _by_group("none").rows(16)
  np.testing.assert_array_equal(shifted, unshifted)
  unshifted, shifted = _by_group("roll", ratio=0.5).rows(8)
  np.testing.assert_array_equal(shifted, [[2, 3, 4, 5], [6, 7, 0, 1]])


def _assembled(attend, q, k, v, segment_ids):
  """S²-Attn over the whole sequence from `attend`'s pieces: each piece's
  rows gathered, interleaved per batch entry, and its output added back
  where the rows came from (written here from the module's contract)."""
  B, T = q.shape[:2]
  unshifted, shifted = attend.rows(T)
  out = jnp.zeros(q.shape, jnp.float32)
  for j, rows in enumerate(zip(unshifted, shifted)):
    take = lambda x: None if x is None else jnp.stack(
        [x[:, rows[0]], x[:, rows[1]]], axis=1).reshape(
            2 * B, len(rows[0]), *x.shape[2:])
    y = attend(take(q), take(k), take(v), piece=j, pieces=len(unshifted),
               segment_ids_BT=take(segment_ids))
    y = y.reshape(B, 2, *y.shape[1:]).astype(jnp.float32)
    out = out.at[:, rows[0]].add(y[:, 0]).at[:, rows[1]].add(y[:, 1])
  return out


# batch, seq, q_heads, kv_heads, group ratio
SHAPES = [(1, 16, 4, 4, 0.25), (2, 24, 8, 2, 0.25), (1, 16, 4, 2, 1.0)]


@pytest.mark.parametrize("implementation", ["dense", "chunked"])
@pytest.mark.parametrize("variant", ["flash", "roll", "none"])
@pytest.mark.parametrize("shape", SHAPES)
def test_pieces_assemble_s2_against_float64(shape, variant, implementation):
  B, T, N, K, ratio = shape
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(x, jnp.float32)
             for x in ref.random_qkv(rng, B, T, N, K, 8))
  w = jnp.asarray(rng.standard_normal((B, T, N, 8)), jnp.float32)
  seg = jnp.asarray(ref.random_segments(rng, B, T))
  attend = _by_group(variant, implementation, ratio)
  def loss(q, k, v):
    out = _assembled(attend, q, k, v, seg)
    return jnp.sum(out * w), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2),
                                               has_aux=True))(q, k, v)
  group = int(T * ratio)
  keys = (ref.s2_head_keys(T, group, N, variant) if variant != "none" else
          [ref.s2_keys(T, group, False, variant)] * N)  # no head shifts
  mask = ref.mask_from_keys(keys, np.asarray(seg), B)
  want, want_grads = ref.attention(q, k, v, mask, w)
  ref.assert_close(out, want, atol=1e-5)
  for got, expected in zip(grads, want_grads):
    ref.assert_close(got, expected, atol=1e-4)


def test_odd_heads_refused():
  q = jnp.zeros((2, 4, 3, 8))
  k = jnp.zeros((2, 4, 1, 8))
  with pytest.raises(ValueError, match="even numbers of query and kv heads"):
    _by_group("flash")(q, k, k, piece=0, pieces=4)
