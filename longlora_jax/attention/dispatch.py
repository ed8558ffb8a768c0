"""Choosing an attention: the registry, S²-Attn's "auto", and `AttentionSpec`.

An attention function maps `q: [batch, seq, q_heads, head_dim]`,
`k, v: [batch, seq, kv_heads, head_dim]` (RoPE already applied) and optional
`segment_ids_BT: [batch, seq]` to `[batch, seq, q_heads, head_dim]`. It
applies the 1/sqrt(head_dim) scale itself and is causal. The model takes a
name, an `AttentionSpec` or any callable with that signature, and this
module is the one place that turns the first two into a function.

  "full"     dense causal attention (`dense`), O(seq^2) memory
  "chunked"  flash-style attention in pure JAX (`chunked`), O(seq)
  "s2"       shifted sparse attention, LongLoRA's S²-Attn (`s2_attention`)
  "pallas"   fused causal flash attention for GPUs (`pallas_s2`)
"""

import dataclasses
import functools
from typing import Callable

import jax

from longlora_jax.attention import pallas_s2
from longlora_jax.attention.chunked import (DEFAULT_BLOCK,
                                            chunked_causal_attention)
from longlora_jax.attention.dense import causal_attention
from longlora_jax.attention.groups import check_variant, s2_group_size
from longlora_jax.attention.s2 import s2_by_reshape

AttentionFn = Callable[..., jax.Array]
KINDS = ("s2", "full")
IMPLEMENTATIONS = ("auto", "xla", "chunked", "pallas", "pallas_interpret")


def s2_attention(q_BTNH, k_BTKH, v_BTKH, *, group_size: int | None = None,
                 group_ratio: float = 0.25, variant: str = "flash",
                 implementation: str = "auto", segment_ids_BT=None,
                 block_size: int = DEFAULT_BLOCK):
  """S²-Attn with the attention signature (groups and variants: `groups`).

  Args:
    q_BTNH: `[batch, seq, q_heads, head_dim]`, RoPE applied (global positions).
    k_BTKH, v_BTKH: `[batch, seq, kv_heads, head_dim]`; query head h reads kv
      head h // (q_heads / kv_heads).
    group_size: tokens per group; default int(seq * group_ratio).
    variant: "flash" (no leak) or "roll" (the paper's, leaks; see `groups`).
    implementation: attention inside the groups. "auto": "pallas" on a GPU
      when the kernel supports the shapes, else "xla" for groups of at most
      `block_size` tokens and "chunked" for larger ones. "xla": dense, memory
      seq * G per head; "chunked": `chunked_causal_attention` with
      `block_size`, memory linear in seq for any G (e.g. G = 25k at 100k
      tokens); "pallas": the fused Pallas Triton kernel
      (`pallas_s2.pallas_s2_attention`, GPU, default tiles; no
      `segment_ids_BT`, `block_size` unused); "pallas_interpret": the same
      kernel through the Pallas interpreter (any backend, slow; for tests).
    segment_ids_BT: packed documents; tokens never attend across them.
  Returns:
    `[batch, seq, q_heads, head_dim]`.
  """
  H = q_BTNH.shape[3]
  G = s2_group_size(q_BTNH.shape[1], q_BTNH.shape[2], group_size, group_ratio)
  check_variant(variant)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown S²-Attn implementation {implementation!r}; "
                     f"choose one of {IMPLEMENTATIONS}")
  if implementation == "auto":
    implementation = ("pallas" if takes_fused_kernel(
        H, packed=segment_ids_BT is not None) else
        "xla" if G <= block_size else "chunked")
  if implementation in ("pallas", "pallas_interpret"):
    return pallas_s2.pallas_s2_attention(
        q_BTNH, k_BTKH, v_BTKH, group_size=G, variant=variant,
        segment_ids_BT=segment_ids_BT,
        interpret=implementation == "pallas_interpret")
  return s2_by_reshape(q_BTNH, k_BTKH, v_BTKH, group_size=G, variant=variant,
                       inner=implementation, block_size=block_size,
                       segment_ids_BT=segment_ids_BT)


def takes_fused_kernel(head_dim: int, *, packed: bool = False,
                       platform: str | None = None) -> bool:
  """Whether "auto" takes the fused kernel: on a GPU (`platform`, default
  JAX's default backend), without packed segments, for a head_dim it has."""
  return (pallas_s2.AVAILABLE and not packed
          and (platform or jax.default_backend()) == "gpu"
          and head_dim in pallas_s2.HEAD_DIMS)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """An attention described by data (hashable, JSON-able): what a run
  records and `get_attention` turns into a function.

  kind: "s2" (S²-Attn, training) or "full" (causal attention).
  variant, group_ratio: S²-Attn's groups (`groups`).
  implementation: for "s2" one of `IMPLEMENTATIONS` (see `s2_attention`);
    for "full", "auto" (flash-style chunks, O(seq) memory), "xla" (dense),
    "chunked" or "pallas".
  """
  kind: str = "s2"
  variant: str = "flash"
  group_ratio: float = 0.25
  implementation: str = "auto"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown attention kind {self.kind!r}; choose one "
                       f"of {KINDS}")
    check_variant(self.variant)
    if self.implementation not in (IMPLEMENTATIONS if self.kind == "s2"
                                   else _FULL):
      raise ValueError(f"unknown {self.kind} attention implementation "
                       f"{self.implementation!r}")


_FULL = {"auto": chunked_causal_attention, "xla": causal_attention,
         "chunked": chunked_causal_attention,
         "pallas": pallas_s2.pallas_causal_attention}
# Training uses S²-Attn; evaluation and generation use full attention.
ATTENTION_FNS: dict[str, AttentionFn] = {
    "full": causal_attention,
    "chunked": chunked_causal_attention,
    "s2": s2_attention,
    "pallas": pallas_s2.pallas_causal_attention,  # fused kernel, GPU (Triton)
}


def get_attention(attention: "str | AttentionSpec | AttentionFn"
                  ) -> AttentionFn:
  """An attention function: by name (see `ATTENTION_FNS`), from an
  `AttentionSpec`, or the callable itself."""
  if isinstance(attention, AttentionSpec):
    if attention.kind == "full":
      return _FULL[attention.implementation]
    return functools.partial(s2_attention, group_ratio=attention.group_ratio,
                             variant=attention.variant,
                             implementation=attention.implementation)
  if callable(attention):
    return attention
  if attention not in ATTENTION_FNS:
    raise ValueError(f"unknown attention {attention!r}; choose one of "
                     f"{sorted(ATTENTION_FNS)}, an AttentionSpec or a function")
  return ATTENTION_FNS[attention]
