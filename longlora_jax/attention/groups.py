"""S²-Attn's group arithmetic, in plain Python (no arrays).

The sequence is cut into groups of G tokens (default seq/4) and each token
attends causally inside its group only. Of N query heads the first
N - floor(N/2) use the groups [0, G), [G, 2G), ...; the last floor(N/2) use
groups shifted by G/2 (`shifted_heads`), so information crosses group
borders. With an even N that is half and half, as in the paper; with an odd
N (SmolLM2-135M has 9) the unshifted half has the extra head, as the
official code's `chunk(2)` of the heads gives. Two variants of the shifted
groups:

  "flash" (default): [0, G/2), [G/2, 3G/2), ..., [seq - G/2, seq), half-size
    first and last groups. What the official code computes through
    flash-attention's variable-length groups (`cu_seqlens`): no token sees a
    later one.
  "roll": the paper's Algorithm 1 and the official non-flash path. Roll the
    shifted heads by -G/2, attend in groups, roll back. The last group wraps
    around, so the first G/2 tokens of the shifted heads see the last G/2
    tokens of the sequence: it LEAKS the future into the past. Offered for
    fidelity to the paper only.

A third, "none", shifts no head: every head attends inside the unshifted
groups only (the paper's "short attention" without the shift, which its
ablation shows fails to extend the context). It is for that comparison
(`bench.ablation`), runs by the reshape implementations only ("dense",
"chunked"; `SHIFTED` are what the fused kernels and context parallelism
take) and is not for real training.

Every implementation (`s2`, `pallas`, `cudnn_grouped`) and the FLOP count
read these.
"""

VARIANTS = ("flash", "roll", "none")
# The variants that shift half of the heads.
SHIFTED = ("flash", "roll")


def check_variant(variant: str, takes: tuple[str, ...] = VARIANTS) -> None:
  """ValueError unless `variant` is one of `takes` (an implementation's)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown S²-Attn variant {variant!r}; choose one of "
                     f"{VARIANTS}")
  if variant not in takes:
    raise ValueError(f"S²-Attn variant {variant!r} runs by the dense or "
                     f"chunked implementation only; this one takes {takes}")


def shift(group_size: int, variant: str) -> int:
  """How far the shifted heads' groups move: G/2, or 0 for "none"."""
  return 0 if variant == "none" else group_size // 2


def s2_group_size(seq: int, group_size: int | None = None,
                  group_ratio: float = 0.25) -> int:
  """The group size for `seq` tokens: `group_size`, else int(seq * ratio).

  Raises ValueError unless the groups tile the sequence and have even size
  (the shift is G/2).
  """
  G = int(seq * group_ratio) if group_size is None else group_size
  if G < 2 or G % 2 or seq % G:
    origin = (f"group_size={G}" if group_size is not None else
              f"group_size=int(seq * group_ratio={group_ratio})={G}")
    raise ValueError(f"S²-Attn needs an even group size that divides the "
                     f"sequence; got seq={seq}, {origin}")
  return G


def shifted_heads(num_heads: int) -> tuple[int, int]:
  """(first shifted query head, number of shifted heads): the last
  floor(N/2) of N heads."""
  return num_heads - num_heads // 2, num_heads // 2


def s2_attended_pairs(seq: int, group_size: int,
                      variant: str = "flash") -> tuple[int, int]:
  """(query, key) pairs that one unshifted and one shifted head attend."""
  G = s2_group_size(seq, group_size)
  check_variant(variant)
  causal = lambda n: n * (n + 1) // 2
  unshifted = seq // G * causal(G)
  if variant != "flash":  # "roll" wraps whole groups; "none" keeps them
    return unshifted, unshifted
  return unshifted, unshifted - causal(G) + 2 * causal(G // 2)
