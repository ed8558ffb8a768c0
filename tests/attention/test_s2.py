import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax.attention.dispatch import s2_attention
from tests.references import attention as ref

# batch, seq, q_heads, kv_heads, group
SHAPES = [
    (1, 16, 4, 4, 4),    # MHA, seq / 4
    (3, 28, 2, 2, 14),   # MHA, batch 3, one head per half; chunked pads
    (3, 32, 8, 2, 16),   # GQA, kv heads split between the halves
    (1, 16, 4, 1, 16),   # one kv head shared by both halves; G = seq
    (3, 24, 6, 3, 6),    # odd kv heads (middle one shared), odd shift 3
    # Odd and uneven head counts (the last floor(N/2) heads shift):
    (1, 16, 9, 3, 4),    # SmolLM2-135M's 9 on 3
    (2, 24, 14, 2, 8),   # 14 on 2: 7 query heads per kv head
    (1, 16, 7, 7, 16),   # 7 heads, MHA, G = seq
]
# Blocks of 5: groups of 4 are one block, 6 -> 3, 8 and 16 -> 4, 14 pads to 15.
IMPLEMENTATIONS = {"dense": (), "chunked": (("block_size", 5),)}


def _reference_mask(batch, seq, q_heads, group, variant, segment_ids=None):
  keys = ref.s2_head_keys(seq, group, q_heads, variant)
  return ref.mask_from_keys(keys, segment_ids, batch)


def _check(shape, variant, implementation, dtype, segments=False, seed=0):
  B, T, N, K, G = shape
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(x, dtype)
             for x in ref.random_qkv(rng, B, T, N, K, 8))
  w = jnp.asarray(rng.standard_normal((B, T, N, 8)), jnp.float32)
  seg = ref.random_segments(rng, B, T) if segments else None
  options = (("group_size", G), ("variant", variant),
             ("implementation", implementation),
             *IMPLEMENTATIONS[implementation])
  out, grads = ref.value_and_grads(s2_attention, options, q, k, v, w,
                                   None if seg is None else jnp.asarray(seg))
  assert out.dtype == dtype and out.shape == (B, T, N, 8)
  mask = _reference_mask(B, T, N, G, variant, seg)
  want, want_grads = ref.attention(q.astype(jnp.float32),
                                   k.astype(jnp.float32),
                                   v.astype(jnp.float32), mask, w)
  if dtype == jnp.float32:
    ref.assert_close(out, want, atol=1e-5)
    for got_g, want_g in zip(grads, want_grads):
      ref.assert_close(got_g, want_g, atol=1e-4)
  else:
    ref.assert_close(out, want, relative=2e-2)
    for got_g, want_g in zip(grads, want_grads):
      ref.assert_close(got_g, want_g, relative=2e-2)


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("variant", ["flash", "roll"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_float32(shape, variant, implementation):
  _check(shape, variant, implementation, jnp.float32)


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("variant", ["flash", "roll"])
def test_matches_reference_with_segments(variant, implementation):
  _check((3, 32, 8, 2, 16), variant, implementation, jnp.float32,
         segments=True, seed=1)


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("variant", ["flash", "roll"])
def test_matches_reference_bfloat16(variant, implementation):
  _check((3, 32, 8, 2, 16), variant, implementation, jnp.bfloat16, seed=2)


def _attended(variant, implementation, seq=16, group=4):
  """Which keys each (query, head) attends: with q = k = 0 the weights are
  uniform over the visible keys, and one-hot values read them out."""
  q = jnp.zeros((1, seq, 4, seq))
  k = jnp.zeros((1, seq, 2, seq))
  v = jnp.broadcast_to(jnp.eye(seq)[None, :, None], (1, seq, 2, seq))
  out = s2_attention(q, k, v, group_size=group, variant=variant,
                     implementation=implementation, block_size=2)
  return np.asarray(out[0] > 0).transpose(1, 0, 2)  # [head, query, key]


def _keys_from_groups(groups, seq):
  """Causal inside each group, in the group's listed order."""
  keys = [None] * seq
  for group in groups:
    for r, t in enumerate(group):
      keys[t] = group[:r + 1]
  return keys


# seq = 16, G = 4, written out by hand. The flash-shifted boundaries
# 0, 2, 6, 10, 14, 16 are the official code's cu_seqlens for the second half.
UNSHIFTED_16_4 = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
SHIFTED_16_4 = {
    "flash": [[0, 1], [2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12, 13], [14, 15]],
    "roll": [[2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12, 13], [14, 15, 0, 1]],
}


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("variant", ["flash", "roll"])
def test_groups_seq16_group4(variant, implementation):
  unshifted = _keys_from_groups(UNSHIFTED_16_4, 16)
  shifted = _keys_from_groups(SHIFTED_16_4[variant], 16)
  # The reference the other tests use agrees with the hand-written groups.
  assert ref.s2_keys(16, 4, False, variant) == unshifted
  assert ref.s2_keys(16, 4, True, variant) == shifted
  got = _attended(variant, implementation)
  for head, keys in enumerate([unshifted] * 2 + [shifted] * 2):
    for t in range(16):
      assert sorted(np.flatnonzero(got[head, t])) == sorted(keys[t]), (head, t)


@jax.jit
def _outputs(q, k, v):
  return {variant: s2_attention(q, k, v, group_size=8, variant=variant)
          for variant in ("flash", "roll")}


def _perturbed_after(x, start, rng):
  x = np.array(x)
  x[:, start:] += rng.standard_normal(x[:, start:].shape)
  return jnp.asarray(x)


def test_flash_never_sees_the_future():
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(x, jnp.float32)
             for x in ref.random_qkv(rng, 2, 32, 4, 2, 8))
  base = _outputs(q, k, v)["flash"]
  for start in range(1, 32):
    new = _outputs(*(_perturbed_after(x, start, rng) for x in (q, k, v)))
    np.testing.assert_array_equal(new["flash"][:, :start], base[:, :start])
    assert not np.allclose(new["flash"][:, start:], base[:, start:])


def test_roll_leaks_exactly_where_the_paper_does():
  seq, group, half = 32, 8, 4
  rng = np.random.default_rng(4)
  q, k, v = (jnp.asarray(x, jnp.float32)
             for x in ref.random_qkv(rng, 2, seq, 4, 2, 8))
  base = _outputs(q, k, v)
  # Change only the last G/2 tokens' keys and values.
  new = _outputs(q, _perturbed_after(k, seq - half, rng),
                 _perturbed_after(v, seq - half, rng))
  early = slice(0, seq - half)
  np.testing.assert_array_equal(new["flash"][:, early], base["flash"][:, early])
  roll_new, roll_base = new["roll"], base["roll"]
  # Unshifted heads (0, 1) and shifted heads' tokens G/2..seq-G/2: untouched.
  np.testing.assert_array_equal(roll_new[:, early, :2], roll_base[:, early, :2])
  np.testing.assert_array_equal(roll_new[:, half:seq - half, 2:],
                                roll_base[:, half:seq - half, 2:])
  # Shifted heads' first G/2 tokens see the last G/2: every one changes.
  changed = np.abs(roll_new[:, :half, 2:] - roll_base[:, :half, 2:]).max(-1)
  assert (changed > 1e-3).all()
  assert group == 2 * half


@pytest.mark.parametrize("kwargs,message", [
    (dict(group_size=6), "seq=16, group_size=6"),     # does not divide
    (dict(group_size=32), "seq=16, group_size=32"),   # larger than seq
    (dict(group_size=0), "group_size=0"),
    (dict(group_ratio=0.0625), "group_size=int(seq * group_ratio=0.0625)=1"),
    (dict(group_size=3, _seq=15), "seq=15, group_size=3"),  # odd G
    (dict(_heads=3, _kv_heads=2), "q_heads=3 is not a multiple of "
                                  "kv_heads=2"),
    (dict(variant="shift"), "unknown S²-Attn variant 'shift'"),
    (dict(implementation="cuda"), "unknown S²-Attn implementation 'cuda'"),
])
def test_value_errors(kwargs, message):
  seq, heads = kwargs.pop("_seq", 16), kwargs.pop("_heads", 4)
  q = jnp.zeros((1, seq, heads, 8))
  k = jnp.zeros((1, seq, kwargs.pop("_kv_heads", 1), 8))
  with pytest.raises(ValueError, match=re.escape(message)):
    s2_attention(q, k, k, **kwargs)


def _grouped_causal_float64(q, k, v, group):
  """Causal softmax attention inside groups [0, G), [G, 2G), ... of every
  head, float64 NumPy; query head h reads kv head h // (N / K)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  k, v = (np.repeat(x, N // x.shape[2], axis=2) for x in (k, v))
  t = np.arange(T)
  visible = (t[None, :] <= t[:, None]) & (t[None, :] // group
                                          == t[:, None] // group)
  scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
  scores = np.where(visible, scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_no_shift_is_grouped_causal_attention(implementation):
  # "none" (the ablation's short attention): no head shifts.
  rng = np.random.default_rng(5)
  q, k, v = ref.random_qkv(rng, 2, 24, 6, 3, 8)
  out = s2_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
                     group_size=6, variant="none",
                     implementation=implementation, block_size=4)
  np.testing.assert_allclose(out, _grouped_causal_float64(q, k, v, 6),
                             atol=2e-6)
  # The fused kernels shift; they refuse it.
  with pytest.raises(ValueError, match="runs by the dense or chunked"):
    s2_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
                 group_size=6, variant="none", implementation="pallas")
