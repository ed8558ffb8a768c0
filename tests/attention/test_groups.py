"""S²-Attn's group arithmetic against hand-computed values and the float64
reference's key sets."""

import re

import pytest

from longlora_jax.attention.groups import (check_variant, s2_attended_pairs,
                                           s2_group_size, shifted_heads)
from tests.references import attention as ref


def test_group_size_from_the_ratio_or_given():
  assert s2_group_size(64) == 16  # a quarter, LongLoRA's default
  assert s2_group_size(64, group_ratio=0.5) == 32
  assert s2_group_size(64, group_size=8) == 8
  assert s2_group_size(8, group_ratio=0.25) == 2  # the smallest group


@pytest.mark.parametrize("seq,kwargs,message", [
    (60, {}, "seq=60, group_size=int(seq * group_ratio=0.25)=15"),  # odd
    (64, dict(group_size=24), "seq=64, group_size=24"),  # does not divide
    (64, dict(group_size=0), "seq=64, group_size=0"),
    (4, dict(group_ratio=0.25), "seq=4, group_size=int(seq * group_ratio="
                                "0.25)=1"),
])
def test_group_size_refuses_groups_that_cannot_shift(seq, kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    s2_group_size(seq, **kwargs)


def test_variants():
  check_variant("flash")
  check_variant("roll")
  check_variant("none")
  with pytest.raises(ValueError, match="unknown S²-Attn variant 'shift'"):
    check_variant("shift")
  with pytest.raises(ValueError, match="'none' runs by the dense or chunked"):
    check_variant("none", ("flash", "roll"))


@pytest.mark.parametrize("heads,want", [(8, (4, 4)), (9, (5, 4)), (1, (1, 0)),
                                        (14, (7, 7))])
def test_the_last_half_of_the_heads_shift(heads, want):
  # As the official code's `chunk(2)`: the first ceil(N/2) keep the groups.
  assert shifted_heads(heads) == want
  keys = ref.s2_head_keys(16, 4, heads, "flash")
  first, count = want
  assert [k == ref.s2_keys(16, 4, True, "flash") for k in keys] == (
      [False] * first + [True] * count)


@pytest.mark.parametrize("variant", ["flash", "roll"])
@pytest.mark.parametrize("seq,group", [(16, 4), (32, 8), (24, 24), (12, 2)])
def test_attended_pairs_count_the_reference_key_sets(seq, group, variant):
  count = lambda shifted: sum(map(len, ref.s2_keys(seq, group, shifted,
                                                   variant)))
  assert s2_attended_pairs(seq, group, variant) == (count(False), count(True))


def test_attended_pairs_by_hand():
  # 16 tokens in groups of 4: 4 groups of 4 * 5 / 2 = 10 pairs; "flash"'s
  # shifted heads have 3 whole groups and two halves of 2 * 3 / 2 = 3.
  assert s2_attended_pairs(16, 4) == (40, 36)
  assert s2_attended_pairs(16, 4, "roll") == (40, 40)
  assert s2_attended_pairs(16, 4, "none") == (40, 40)  # no shift
