"""The fused kernels' tiles: the block ranges, evaluated eagerly, against
the reference key sets (on whole sequences and on context windows), and the
S² mask against them."""

import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax.attention.pallas import blocks
from tests.references import attention as ref

# The block ranges, evaluated eagerly, against the reference key sets: a
# kernel visits exactly the tiles with at least one visible (query, key) pair
# (so blocks outside a head's groups are never loaded), each once, and skips
# the mask only on tiles where every pair is visible.

def _visible_tiles(keys, block_q, block_k, seq=None):
  """(any, all) visible pairs per [query tile, key tile] of a mask whose
  row t lists the key indices query t sees (`seq` keys, default one per
  query)."""
  mask = np.zeros((len(keys), seq or len(keys)), bool)
  for t, ks in enumerate(keys):
    mask[t, ks] = True
  tiles = mask.reshape(mask.shape[0] // block_q, block_q,
                       mask.shape[1] // block_k, block_k)
  return tiles.any((1, 3)), tiles.all((1, 3))


def _ranges_to_sets(ranges):
  lo, a, b, hi, wrap = ranges
  lo, a, b, hi = int(lo), int(a), int(b), int(hi)
  wrap_lo, wrap_hi = (0, 0) if wrap is None else (int(w) for w in wrap)
  masked = [*range(lo, a), *range(b, hi), *range(wrap_lo, wrap_hi)]
  unmasked = list(range(a, b))
  assert len(set(masked + unmasked)) == len(masked + unmasked), ranges
  return set(masked), set(unmasked)


def _assert_exact_ranges(groups, scalars, keys, queries, block_q, block_k):
  """For both heads, the key blocks of every query block and the query
  blocks of every key block are exactly the tiles with a visible pair, and
  the unmasked ones have only visible pairs."""
  for head in (0, 1):
    frame = groups.frame(scalars, jnp.int32(head))
    any_QK, all_QK = _visible_tiles(keys[head], block_q, block_k, groups.seq)
    for i in range(queries // block_q):
      masked, unmasked = _ranges_to_sets(blocks.key_blocks(
          groups, frame.q_start + i * block_q, block_q, block_k, frame))
      assert masked | unmasked == set(np.flatnonzero(any_QK[i])), (head, i)
      assert all(all_QK[i, j] for j in unmasked), (head, i)
    for j in range(groups.seq // block_k):
      masked, unmasked = _ranges_to_sets(blocks.query_blocks(
          groups, jnp.int32(j * block_k), block_k, block_q, frame, queries))
      assert masked | unmasked == set(np.flatnonzero(any_QK[:, j])), (head, j)
      assert all(all_QK[i, j] for i in unmasked), (head, j)


RANGE_CASES = [  # seq, group, block_q, block_k
    (64, 8, 16, 16), (64, 16, 16, 32), (64, 32, 32, 16), (64, 64, 16, 16),
    (96, 48, 16, 32), (96, 24, 32, 16), (128, 32, 64, 16), (128, 128, 64, 32),
]


@pytest.mark.parametrize("variant", ["flash", "roll"])
@pytest.mark.parametrize("seq,group,block_q,block_k", RANGE_CASES)
def test_block_ranges_are_exact(seq, group, block_q, block_k, variant):
  groups = blocks.Groups(seq=seq, size=group, shift=group // 2,
                                 wrap=variant == "roll", heads=2)
  keys = [ref.s2_keys(seq, group, head == 1, variant) for head in (0, 1)]
  _assert_exact_ranges(groups, groups.scalars(), keys, seq, block_q, block_k)


def _window_keys(seq, group, shifted, q_start, origin, queries, keys):
  """The reference key sets (`ref.s2_keys` of the whole sequence) of
  queries at global positions origin + q_start + i, as key indices of the
  window [origin, origin + keys)."""
  whole = ref.s2_keys(seq, group, shifted, "flash")
  return [[k - origin for k in whole[origin + q_start + i]
           if 0 <= k - origin < keys] for i in range(queries)]


# seq, group, queries, q_start, origin, block_q, block_k: windows as a
# context axis cuts them (origin < 0: a halo wrapped from the sequence's
# end), and a full-attention window (one group of seq) at a late slice.
WINDOW_CASES = [
    (128, 32, 16, 16, -16, 16, 16), (128, 32, 16, 16, 16, 16, 16),
    (128, 64, 32, 48, 0, 16, 16), (128, 64, 32, 48, 48, 32, 16),
    (192, 48, 32, 32, 40, 16, 32), (128, 128, 32, 96, 0, 32, 16),
    (128, 32, 32, 0, 64, 32, 32), (128, 32, 16, 16, -8, 8, 16),
    (96, 24, 16, 24, -12, 8, 8),
    # Queries not on a key-block border: full attention at an offset of 40,
    # S² windows offset by 20 and 12.
    (128, 128, 16, 40, 0, 16, 8), (128, 32, 16, 20, 4, 16, 4),
    (96, 24, 32, 12, -6, 8, 4),
]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=str)
def test_block_ranges_are_exact_on_windows(case):
  seq, group, queries, q_start, origin, block_q, block_k = case
  keys = q_start + queries
  groups = blocks.Groups(seq=keys, size=group, shift=group // 2,
                                 wrap=False, heads=2)
  window = [_window_keys(seq, group, head == 1, q_start, origin, queries,
                         keys) for head in (0, 1)]
  _assert_exact_ranges(groups, groups.scalars(q_start, origin), window,
                       queries, block_q, block_k)


@pytest.mark.parametrize("variant", ["flash", "roll"])
@pytest.mark.parametrize("seq,group", [(32, 8), (48, 12), (32, 32)])
def test_mask_is_the_reference_key_sets(seq, group, variant):
  groups = blocks.Groups(seq=seq, size=group, shift=group // 2,
                                 wrap=variant == "roll", heads=2)
  t = jnp.arange(seq)
  for head in (0, 1):
    visible = groups.visible(t[:, None], t[None, :], groups.frame(
        groups.scalars(), jnp.int32(head)))
    keys = ref.s2_keys(seq, group, head == 1, variant)
    assert [list(np.flatnonzero(row)) for row in np.asarray(visible)] == [
        sorted(ks) for ks in keys]  # "roll" lists keys in rolled order


def test_scalars_place_a_window_in_the_sequence():
  # Groups of 16, shifted by 8. Key 0 of the window at global position -8
  # (a halo wrapped from the sequence's end): the first unshifted boundary
  # is key 8 (global 0), the first shifted one key 0 (global -8), and the
  # first real key is 8. At global 40: boundaries at keys 8 (48) and 0 (40).
  groups = blocks.Groups(seq=64, size=16, shift=8, wrap=False, heads=2)
  assert groups.scalars(4, -8).tolist() == [4, 8, 0, 8]
  assert groups.scalars(0, 40).tolist() == [0, 8, 0, 0]
  traced = groups.scalars(jnp.int32(4), jnp.int32(-8))
  assert traced.dtype == jnp.int32 and traced.tolist() == [4, 8, 0, 8]
  rolled = blocks.Groups(seq=64, size=16, shift=8, wrap=True, heads=2)
  with pytest.raises(ValueError, match="need the whole sequence"):
    rolled.scalars(4, 0)


def test_visit_runs_the_ranges_in_order_with_their_masks():
  # Blocks [1, 3) and [5, 6) and the wrapped [8, 9) masked, [3, 5) not:
  # each block adds 2**block to its sum.
  add = lambda i, sums, masked: sums.at[0 if masked else 1].add(
      jnp.left_shift(1, i))
  sums = blocks.visit((1, 3, 5, 6, (8, 9)), add, jnp.zeros(2, jnp.int32))
  assert sums.tolist() == [2 + 4 + 32 + 256, 8 + 16]
  assert blocks.visit((1, 3, 5, 6, None), add,
                      jnp.zeros(2, jnp.int32)).tolist() == [38, 24]
