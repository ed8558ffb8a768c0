"""Choosing an attention: the registry, S²-Attn's "auto", and `AttentionSpec`.

An attention function maps `q: [batch, seq, q_heads, head_dim]`,
`k, v: [batch, seq, kv_heads, head_dim]` (RoPE already applied) and optional
`segment_ids_BT: [batch, seq]` to `[batch, seq, q_heads, head_dim]`. It
applies the 1/sqrt(head_dim) scale itself and is causal. The model takes a
name, an `AttentionSpec` or any callable with that signature, and this
module is the one place that turns the first two into a function.

  "auto"     full causal attention, the fastest on this backend
             (`full_attention`: cuDNN or the Pallas kernel on NVIDIA GPUs,
             "chunked" elsewhere)
  "full"     dense causal attention (`dense`), O(seq^2) memory
  "chunked"  flash-style attention in pure JAX (`chunked`), O(seq)
  "s2"       shifted sparse attention, LongLoRA's S²-Attn (`s2_attention`)
  "pallas"   fused causal flash attention for GPUs (`pallas_s2`)
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from longlora_jax.attention import context, cudnn_s2, pallas_s2
from longlora_jax.attention.chunked import (chunked_causal_attention,
                                            default_block)
from longlora_jax.attention.dense import causal_attention
from longlora_jax.attention.groups import check_variant, s2_group_size
from longlora_jax.attention.s2 import s2_by_reshape

AttentionFn = Callable[..., jax.Array]
KINDS = ("s2", "full")
# What "auto" prefers on an NVIDIA GPU, fastest first: on an H100 grouped
# cuDNN attention's forward + backward takes 0.71x, 0.52x and 0.44x the
# Pallas kernel's time at 8k, 16k and 32k tokens (BENCHMARKS.md); the
# kernel runs what cuDNN does not take (float32 inputs).
FUSED_PREFERENCE = ("cudnn", "pallas")
IMPLEMENTATIONS = ("auto", "cudnn", "pallas", "xla", "chunked",
                   "pallas_interpret")


def s2_attention(q_BTNH, k_BTKH, v_BTKH, *, group_size: int | None = None,
                 group_ratio: float = 0.25, variant: str = "flash",
                 implementation: str = "auto", segment_ids_BT=None,
                 block_size: int | None = None):
  """S²-Attn with the attention signature (groups and variants: `groups`).

  Args:
    q_BTNH: `[batch, seq, q_heads, head_dim]`, RoPE applied (global positions).
    k_BTKH, v_BTKH: `[batch, seq, kv_heads, head_dim]`; query head h reads kv
      head h // (q_heads / kv_heads).
    group_size: tokens per group; default int(seq * group_ratio).
    variant: "flash" (no leak) or "roll" (the paper's, leaks; see `groups`).
    implementation: attention inside the groups. "auto": on an NVIDIA GPU
      the fused implementation that takes the shapes (`fused_for`), else
      "xla" for groups of at most `block_size` tokens and "chunked" for
      larger ones. "cudnn": grouped cuDNN flash attention
      (`cudnn_s2.cudnn_s2_attention`; bfloat16/float16, no
      `segment_ids_BT`); "pallas": the fused Pallas Triton kernel
      (`pallas_s2.pallas_s2_attention`, GPU, default tiles; no
      `segment_ids_BT`, `block_size` unused); "xla": dense, memory seq * G
      per head; "chunked": `chunked_causal_attention` with `block_size`,
      memory linear in seq for any G (e.g. G = 25k at 100k tokens);
      "pallas_interpret": the Pallas kernel through the Pallas interpreter
      (any backend, slow; for tests).
    segment_ids_BT: packed documents; tokens never attend across them.
  Returns:
    `[batch, seq, q_heads, head_dim]`.
  """
  H = q_BTNH.shape[3]
  G = s2_group_size(q_BTNH.shape[1], group_size, group_ratio)
  if block_size is None:
    block_size = default_block()
  check_variant(variant)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown S²-Attn implementation {implementation!r}; "
                     f"choose one of {IMPLEMENTATIONS}")
  if implementation == "auto":
    implementation = fused_for(H, q_BTNH.dtype,
                               packed=segment_ids_BT is not None) or (
        "xla" if G <= block_size else "chunked")
  if implementation == "cudnn":
    return cudnn_s2.cudnn_s2_attention(
        q_BTNH, k_BTKH, v_BTKH, group_size=G, variant=variant,
        segment_ids_BT=segment_ids_BT)
  if implementation in ("pallas", "pallas_interpret"):
    return pallas_s2.pallas_s2_attention(
        q_BTNH, k_BTKH, v_BTKH, group_size=G, variant=variant,
        segment_ids_BT=segment_ids_BT,
        interpret=implementation == "pallas_interpret")
  return s2_by_reshape(q_BTNH, k_BTKH, v_BTKH, group_size=G, variant=variant,
                       inner=implementation, block_size=block_size,
                       segment_ids_BT=segment_ids_BT)


def fused_for(head_dim: int, dtype, *, packed: bool = False,
              platform: str | None = None) -> str | None:
  """The fused implementation "auto" takes on this backend, or None: on an
  NVIDIA GPU (`platform`, default JAX's default backend), without packed
  segments, the first of `FUSED_PREFERENCE` that takes `head_dim` and
  `dtype`."""
  if packed or not on_nvidia_gpu(platform):
    return None
  takes = {
      "cudnn": jnp.dtype(dtype) in map(jnp.dtype, cudnn_s2.DTYPES)
               and head_dim in cudnn_s2.HEAD_DIMS,
      "pallas": pallas_s2.AVAILABLE and head_dim in pallas_s2.HEAD_DIMS,
  }
  return next((name for name in FUSED_PREFERENCE if takes[name]), None)


def on_nvidia_gpu(platform: str | None = None) -> bool:
  """`platform` "gpu" (a compile-only NVIDIA target), else whether the
  devices being compiled for are NVIDIA GPUs: the context mesh's (`jax.
  set_mesh`, as the compile-only plans lower under a mesh of GPUs that are
  not here), or JAX's default backend's (ROCm reports "gpu" too)."""
  if platform is not None:
    return platform == "gpu"
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  if device is not None:
    platform, kind = device.platform, device.device_kind
  else:
    platform, kind = jax.default_backend(), jax.devices()[0].device_kind
  return platform == "gpu" and kind.startswith("NVIDIA")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """An attention described by data (hashable, JSON-able): what a run
  records and `get_attention` turns into a function.

  kind: "s2" (S²-Attn, training) or "full" (causal attention).
  variant, group_ratio: S²-Attn's groups (`groups`).
  implementation: for "s2" one of `IMPLEMENTATIONS` (see `s2_attention`);
    for "full" one of `FULL_IMPLEMENTATIONS` (see `full_attention`).
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
                                   else FULL_IMPLEMENTATIONS):
      raise ValueError(f"unknown {self.kind} attention implementation "
                       f"{self.implementation!r}")


FULL_IMPLEMENTATIONS = ("auto", "cudnn", "pallas", "xla", "chunked")


def full_attention(q_BTNH, k_BTKH, v_BTKH, *, segment_ids_BT=None,
                   implementation: str = "auto",
                   block_size: int | None = None):
  """Causal attention over the whole sequence, with the attention signature.

  implementation: "auto" the fastest this backend has: on an NVIDIA GPU the
  fused one that takes the shapes (`fused_for`: cuDNN, else the Pallas
  kernel), else "chunked"; "cudnn" (`cudnn_s2.cudnn_causal_attention`),
  "pallas" (`pallas_s2.pallas_causal_attention`), "chunked" (flash-style in
  pure JAX, `block_size`) or "xla" (dense, seq^2 memory).
  """
  if implementation not in FULL_IMPLEMENTATIONS:
    raise ValueError(f"unknown full attention implementation "
                     f"{implementation!r}; choose one of "
                     f"{FULL_IMPLEMENTATIONS}")
  if implementation == "auto":
    implementation = fused_for(q_BTNH.shape[3], q_BTNH.dtype,
                               packed=segment_ids_BT is not None) or "chunked"
  if implementation == "chunked":
    return chunked_causal_attention(q_BTNH, k_BTKH, v_BTKH,
                                    segment_ids_BT=segment_ids_BT,
                                    block_size=block_size)
  fn = {"cudnn": cudnn_s2.cudnn_causal_attention,
        "pallas": pallas_s2.pallas_causal_attention,
        "xla": causal_attention}[implementation]
  return fn(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT=segment_ids_BT)


# Training uses S²-Attn; evaluation and generation use full attention.
ATTENTION_FNS: dict[str, AttentionFn] = {
    "auto": full_attention,  # the fastest causal attention on this backend
    "full": causal_attention,
    "chunked": chunked_causal_attention,
    "s2": s2_attention,
    "pallas": pallas_s2.pallas_causal_attention,  # fused kernel, GPU (Triton)
}


def context_form(attention_fn: AttentionFn) -> AttentionFn | None:
  """The context-parallel form (`context`) of an attention function made
  here (S²-Attn, or any causal attention), or None for other callables;
  its implementation is chosen when called (`context_implementation`)."""
  fn, kw = attention_fn, {}
  if isinstance(attention_fn, functools.partial):
    fn, kw = attention_fn.func, attention_fn.keywords
  implementation = kw.get("implementation", "auto")
  if fn is s2_attention:
    return functools.partial(
        _in_context, context.s2_context_attention, implementation,
        group_size=kw.get("group_size"),
        group_ratio=kw.get("group_ratio", 0.25),
        variant=kw.get("variant", "flash"), block_size=kw.get("block_size"))
  if fn is pallas_s2.pallas_causal_attention:
    implementation = "pallas_interpret" if kw.get("interpret") else "pallas"
  elif fn in (causal_attention, chunked_causal_attention):
    implementation = "xla"
  elif fn is not full_attention:
    return None
  return functools.partial(_in_context, context.full_context_attention,
                           implementation, block_size=kw.get("block_size"))


def _in_context(context_fn, implementation, q_BTNH, k_BTKH, v_BTKH, *,
                segment_ids_BT=None, **options):
  return context_fn(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT=segment_ids_BT,
                    implementation=context_implementation(
                        implementation, q_BTNH.shape[3], q_BTNH.dtype,
                        packed=segment_ids_BT is not None), **options)


def context_implementation(implementation: str, head_dim: int, dtype, *,
                           packed: bool = False) -> str:
  """What runs attention under a context axis (`context`): the fused Pallas
  kernel on each device's window wherever a fused implementation was asked
  for or "auto" would fuse (`fused_for`), else the XLA path ("xla"). Not
  cuDNN: its masks are fixed when it compiles, and a window's groups start
  at a place that depends on the device."""
  if implementation in context.KERNELS:
    return implementation
  fuse = implementation in ("cudnn", "pallas") or (
      implementation == "auto" and fused_for(head_dim, dtype, packed=packed)
      and pallas_s2.AVAILABLE and head_dim in pallas_s2.HEAD_DIMS)
  return "pallas" if fuse else "xla"


def get_attention(attention: "str | AttentionSpec | AttentionFn"
                  ) -> AttentionFn:
  """An attention function: by name (see `ATTENTION_FNS`), from an
  `AttentionSpec`, or the callable itself."""
  if isinstance(attention, AttentionSpec):
    if attention.kind == "full":
      return functools.partial(full_attention,
                               implementation=attention.implementation)
    return functools.partial(s2_attention, group_ratio=attention.group_ratio,
                             variant=attention.variant,
                             implementation=attention.implementation)
  if callable(attention):
    return attention
  if attention not in ATTENTION_FNS:
    raise ValueError(f"unknown attention {attention!r}; choose one of "
                     f"{sorted(ATTENTION_FNS)}, an AttentionSpec or a function")
  return ATTENTION_FNS[attention]
