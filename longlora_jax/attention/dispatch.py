"""Choosing an attention: the names, the implementations and "auto",
`AttentionSpec`, each attention's context-parallel form, and the attention
of new tokens over the KV cache.

An attention function maps `q: [batch, seq, q_heads, head_dim]`,
`k, v: [batch, seq, kv_heads, head_dim]` (RoPE already applied) and optional
`segment_ids_BT: [batch, seq]` to `[batch, seq, q_heads, head_dim]`. It
applies the 1/sqrt(head_dim) scale itself and is causal. The model takes a
name, an `AttentionSpec` or any callable with that signature, and this
module is the one place that turns the first two into a function.

Names (`ATTENTION_FNS`): "s2", shifted sparse attention, LongLoRA's S²-Attn
(`s2_attention`); "full", full attention: causal attention over the whole
sequence (`full_attention`, its implementation chosen by "auto"); and full
attention by one implementation: "dense", "chunked", "pallas".

Implementations (`IMPLEMENTATIONS`, for S²-Attn, full attention, the cache):

  "auto"     the fastest that takes the shapes on this backend (`fused_for`)
  "cudnn"    cuDNN's fused flash attention (`cudnn_grouped`), NVIDIA GPUs
  "pallas"   the fused Pallas kernels (`pallas`), NVIDIA GPUs
  "dense"    the whole score matrix at once (`dense`), O(seq^2) memory
  "chunked"  flash-style in pure JAX (`chunked`), memory linear in seq
  "pallas_interpret"  the Pallas kernels interpreted (any backend; tests)
"""

import dataclasses
import functools
import inspect
from typing import Callable

import jax
import jax.numpy as jnp

from longlora_jax.attention import context, cudnn_grouped
from longlora_jax.attention.by_group import S2ByGroup
from longlora_jax.attention.cached import (CACHE_BLOCK,
                                           chunked_cached_attention,
                                           on_each_device)
from longlora_jax.attention.chunked import (chunked_causal_attention,
                                            default_block)
from longlora_jax.attention.dense import dense_causal_attention
from longlora_jax.attention.groups import (SHIFTED, check_variant,
                                           s2_group_size)
from longlora_jax.attention.local import (check_softcap, refuse_window,
                                          windowed_attention)
from longlora_jax.attention.pallas import cached as pallas_cached
from longlora_jax.attention.pallas import grouped as pallas_grouped
from longlora_jax.attention.s2 import s2_by_reshape
from longlora_jax.core.errors import LongLoraError
from longlora_jax.parallel.sharding import per_row_shard

AttentionFn = Callable[..., jax.Array]
KINDS = ("s2", "full")
# What "auto" prefers on an NVIDIA GPU, fastest first (BENCHMARKS.md); the
# Pallas kernel runs what cuDNN does not take (float32, head dims past it).
FUSED_PREFERENCE = ("cudnn", "pallas")
IMPLEMENTATIONS = ("auto", *FUSED_PREFERENCE, "dense", "chunked",
                   "pallas_interpret")
# The cache's attention: no dense form (it reads the cache by blocks), no
# cuDNN one (its causal mask is anchored at key 0, the queries at `start`).
CACHED_IMPLEMENTATIONS = tuple(i for i in IMPLEMENTATIONS
                               if i not in ("cudnn", "dense"))


def check_implementation(implementation: str, what: str,
                         takes: tuple[str, ...] = IMPLEMENTATIONS) -> None:
  """ValueError unless `implementation` is one of `takes`."""
  if implementation not in takes:
    raise ValueError(f"unknown {what} implementation {implementation!r}; "
                     f"choose one of {takes}")


def s2_attention(q_BTNH, k_BTKH, v_BTKH, *, group_size: int | None = None,
                 group_ratio: float = 0.25, variant: str = "flash",
                 implementation: str = "auto", segment_ids_BT=None,
                 block_size: int | None = None, softcap: float | None = None):
  """S²-Attn with the attention signature (groups and variants: `groups`).

  Args:
    q_BTNH: `[batch, seq, q_heads, head_dim]`, RoPE applied (global positions).
    k_BTKH, v_BTKH: `[batch, seq, kv_heads, head_dim]`; query head h reads kv
      head h // (q_heads / kv_heads).
    group_size: tokens per group; default int(seq * group_ratio).
    variant: "flash" (no leak), "roll" (the paper's, leaks) or "none" (no
      shift, groups only; "dense" and "chunked"); see `groups`.
    implementation: attention inside the groups, one of `IMPLEMENTATIONS`
      (the module's table; "cudnn" runs bfloat16/float16; the fused ones
      take no `segment_ids_BT`). "auto": on an NVIDIA GPU the fused
      implementation that takes the shapes (`fused_for`), else "dense"
      (memory seq * G per head) for groups of at most `block_size` tokens
      and "chunked" (memory linear in seq for any G) for larger ones.
    segment_ids_BT: packed documents; tokens never attend across them.
    softcap: scores soft-capped, cap * tanh(s / cap) (Gemma 2); "auto"
      then never takes cuDNN, which has no soft-cap.
  Returns:
    `[batch, seq, q_heads, head_dim]`.
  """
  H = q_BTNH.shape[3]
  G = s2_group_size(q_BTNH.shape[1], group_size, group_ratio)
  if block_size is None:
    block_size = default_block()
  check_variant(variant)
  check_implementation(implementation, "S²-Attn")
  check_softcap(implementation, softcap)
  if implementation == "auto":
    # The fused kernels shift; "none" runs by the reshapes.
    implementation = (variant in SHIFTED and fused_for(
        H, q_BTNH.dtype, packed=segment_ids_BT is not None,
        softcap=softcap)) or ("dense" if G <= block_size else "chunked")
  if implementation == "cudnn":
    return cudnn_grouped.cudnn_s2_attention(
        q_BTNH, k_BTKH, v_BTKH, group_size=G, variant=variant,
        segment_ids_BT=segment_ids_BT)
  if implementation in ("pallas", "pallas_interpret"):
    return pallas_grouped.pallas_s2_attention(
        q_BTNH, k_BTKH, v_BTKH, group_size=G, variant=variant,
        segment_ids_BT=segment_ids_BT,
        interpret=implementation == "pallas_interpret", softcap=softcap)
  return s2_by_reshape(q_BTNH, k_BTKH, v_BTKH, group_size=G, variant=variant,
                       inner=implementation, block_size=block_size,
                       segment_ids_BT=segment_ids_BT, softcap=softcap)


def full_attention(q_BTNH, k_BTKH, v_BTKH, *, segment_ids_BT=None,
                   implementation: str = "auto",
                   block_size: int | None = None,
                   softcap: float | None = None):
  """Full attention, causal over the whole sequence (the attention signature).

  implementation: one of `IMPLEMENTATIONS`; "auto" the fastest this backend
  has: on an NVIDIA GPU the fused one that takes the shapes (`fused_for`:
  cuDNN, else the Pallas kernel), else "chunked" (`block_size`).
  softcap: as `s2_attention`'s.
  """
  check_implementation(implementation, "full attention")
  check_softcap(implementation, softcap)
  if implementation == "auto":
    implementation = fused_for(q_BTNH.shape[3], q_BTNH.dtype,
                               packed=segment_ids_BT is not None,
                               softcap=softcap) or "chunked"
  if implementation == "chunked":
    return chunked_causal_attention(q_BTNH, k_BTKH, v_BTKH,
                                    segment_ids_BT=segment_ids_BT,
                                    block_size=block_size, softcap=softcap)
  if implementation in ("pallas", "pallas_interpret"):
    return pallas_grouped.pallas_causal_attention(
        q_BTNH, k_BTKH, v_BTKH, segment_ids_BT=segment_ids_BT,
        interpret=implementation == "pallas_interpret", softcap=softcap)
  if implementation == "dense":
    return dense_causal_attention(q_BTNH, k_BTKH, v_BTKH,
                                  segment_ids_BT=segment_ids_BT,
                                  softcap=softcap)
  return cudnn_grouped.cudnn_causal_attention(q_BTNH, k_BTKH, v_BTKH,
                                              segment_ids_BT=segment_ids_BT)


def fused_for(head_dim: int, dtype, *, packed: bool = False,
              platform: str | None = None, softcap=None) -> str | None:
  """The fused implementation "auto" takes on this backend, or None: on an
  NVIDIA GPU (`platform`, default JAX's default backend), without packed
  segments, the first of `FUSED_PREFERENCE` that takes `head_dim` and
  `dtype`, and a `softcap` where one is set (cuDNN does not)."""
  if packed or not on_nvidia_gpu(platform):
    return None
  takes = {
      "cudnn": jnp.dtype(dtype) in map(jnp.dtype, cudnn_grouped.DTYPES)
               and head_dim in cudnn_grouped.HEAD_DIMS and not softcap,
      "pallas": pallas_grouped.AVAILABLE
                and head_dim in pallas_grouped.HEAD_DIMS,
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

  kind: "s2" (S²-Attn, training) or "full" (full attention).
  variant, group_ratio: S²-Attn's groups (`groups`).
  implementation: one of `IMPLEMENTATIONS` (see `s2_attention`,
    `full_attention`).
  by_group: S²-Attn only: the model runs each layer's attention block one
    group at a time (`by_group`: less memory, one more forward).
  """
  kind: str = "s2"
  variant: str = "flash"
  group_ratio: float = 0.25
  implementation: str = "auto"
  by_group: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown attention kind {self.kind!r}; choose one "
                       f"of {KINDS}")
    check_variant(self.variant)
    check_implementation(self.implementation,
                         "S²-Attn" if self.kind == "s2" else "full attention")
    if self.by_group and self.kind != "s2":
      raise ValueError("by_group runs S²-Attn's groups, not full attention")


# Training uses S²-Attn; evaluation and generation use full attention.
ATTENTION_FNS: dict[str, AttentionFn] = {
    "full": full_attention,  # by the fastest implementation on this backend
    "dense": dense_causal_attention,
    "chunked": chunked_causal_attention,
    "pallas": pallas_grouped.pallas_causal_attention,  # fused kernel, GPU
    "s2": s2_attention,
}


def get_attention(attention: "str | AttentionSpec | AttentionFn"
                  ) -> AttentionFn:
  """An attention function: by name (see `ATTENTION_FNS`), from an
  `AttentionSpec`, or the callable itself."""
  if isinstance(attention, AttentionSpec):
    full = functools.partial(full_attention,
                             implementation=attention.implementation)
    if attention.kind == "full":
      return full
    if attention.by_group:  # each piece is causal attention: `by_group`
      return S2ByGroup(attention.group_ratio, attention.variant, full)
    return functools.partial(s2_attention, group_ratio=attention.group_ratio,
                             variant=attention.variant,
                             implementation=attention.implementation)
  if callable(attention):
    return attention
  if attention not in ATTENTION_FNS:
    raise ValueError(f"unknown attention {attention!r}; choose one of "
                     f"{sorted(ATTENTION_FNS)}, an AttentionSpec or a function")
  return ATTENTION_FNS[attention]


# ---- sliding-window layers ----

def layer_attention(attention_fn: AttentionFn, window: int | None,
                    local_L: tuple[bool, ...], softcap: float | None = None):
  """The attention of each layer of a model with sliding-window layers:
  `attend(q, k, v, *, segment_ids_BT, layer)`, each device on its own rows
  (`per_row_shard`).

  The rule: a layer's window decides. A global layer (`local_L[layer]`
  False) runs `attention_fn`: S²-Attn in training, full attention
  otherwise. A local layer keeps its window in training and inference
  alike (its weights were trained with it; it already bounds the cost):
  `windowed_attention`, "dense" where `attention_fn` names it, else
  "chunked". Mixed layers: `jax.lax.cond` on the layer index inside the
  layer scan (one compiled body, no unrolling). `softcap` (Gemma 2) is
  bound into both; an attention that takes none is refused.
  """
  fn, options = _unbound(attention_fn)
  if softcap:
    if fn not in (s2_attention, full_attention, dense_causal_attention,
                  chunked_causal_attention,
                  pallas_grouped.pallas_causal_attention):
      raise LongLoraError(
          f"attention {getattr(fn, '__name__', fn)!r} applies no logit "
          "soft-cap, which this model needs; use one the library names")
    attention_fn = functools.partial(fn, **options, softcap=softcap)
  attend = per_row_shard(attention_fn, None if softcap else
                         context_form(attention_fn))
  if not any(local_L):
    return lambda *qkv, segment_ids_BT=None, layer=None: attend(
        *qkv, segment_ids_BT=segment_ids_BT)
  windowed = functools.partial(
      windowed_attention, window=window, softcap=softcap,
      implementation="dense" if options.get("implementation") == "dense" or
      attention_fn is dense_causal_attention else "chunked")
  local = per_row_shard(windowed, context_form(windowed))

  def per_layer(*qkv, segment_ids_BT=None, layer=None):
    run = lambda fn: lambda *x: fn(*x, segment_ids_BT=segment_ids_BT)
    if all(local_L):
      return run(local)(*qkv)
    return jax.lax.cond(jnp.asarray(local_L)[layer], run(local), run(attend),
                        *qkv)
  return per_layer


# ---- context parallelism ----

def _s2_context(*, implementation="auto", group_size=None, group_ratio=0.25,
                variant="flash", block_size=None):
  return functools.partial(
      _in_context, context.s2_context_attention, implementation,
      group_size=group_size, group_ratio=group_ratio, variant=variant,
      block_size=block_size)


def _full_context(*, implementation="auto", block_size=None):
  return functools.partial(_in_context, context.full_context_attention,
                           implementation, block_size=block_size)


# Each attention function the library hands out (`ATTENTION_FNS`,
# `get_attention`) -> its context-parallel form, made from the function's
# keyword options.
CONTEXT_FORMS: dict[AttentionFn, Callable[..., AttentionFn]] = {
    s2_attention: _s2_context,
    full_attention: _full_context,
    dense_causal_attention: lambda: _full_context(implementation="chunked"),
    chunked_causal_attention: lambda *, block_size=None: _full_context(
        implementation="chunked", block_size=block_size),
    pallas_grouped.pallas_causal_attention:
        lambda *, config=None, interpret=False: _full_context(
            implementation="pallas_interpret" if interpret else "pallas"),
    windowed_attention: lambda **_: refuse_window,
}


def context_form(attention_fn: AttentionFn) -> AttentionFn | None:
  """The context-parallel form (`context`) of an attention function the
  library hands out, also as `functools.partial` of one with keyword
  options (`CONTEXT_FORMS`); its implementation is chosen when called
  (`context_implementation`). A function that wraps one (`functools.wraps`)
  gets a form that refuses to run, in one line: the wrapper would be left
  out. None for other callables (`per_row_shard` refuses them)."""
  fn, options = _unbound(attention_fn)
  make = _registered(fn)
  if make is not None:
    return make(**options)
  inner, _ = _unbound(inspect.unwrap(fn))
  if inner is not fn and _registered(inner) is not None:
    return functools.partial(_refuse, inner)
  return None


def _unbound(fn):
  """(function, keyword options) of a `functools.partial` that binds
  keywords only, else (fn, {})."""
  if isinstance(fn, functools.partial) and not fn.args:
    return fn.func, fn.keywords
  return fn, {}


def _registered(fn):
  return next((make for f, make in CONTEXT_FORMS.items() if f is fn), None)


def _refuse(inner, *args, **kwargs):
  name = getattr(inner, "__name__", repr(inner))
  raise LongLoraError(
      f"a function wrapping {name} has no context-parallel form (it would "
      f"leave the wrapper out); under a context axis pass {name} itself "
      f"(functools.partial for its options) or an AttentionSpec")


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
  for or "auto" would fuse (`fused_for`), else "chunked". Not cuDNN: its
  masks are fixed when it compiles, and a window's groups start at a place
  that depends on the device."""
  if implementation in context.KERNELS:
    return implementation
  fuse = implementation in FUSED_PREFERENCE or (
      implementation == "auto" and fused_for(head_dim, dtype, packed=packed)
      and pallas_grouped.AVAILABLE and head_dim in pallas_grouped.HEAD_DIMS)
  return "pallas" if fuse else "chunked"


# ---- generation ----

def cached_attention(q_BCNH, k_LBKHS, v_LBKSH, layer, start, *,
                     implementation: str = "auto", block: int = CACHE_BLOCK,
                     window=None, softcap: float | None = None):
  """Causal attention of C new queries at positions start..start+C-1 over
  layer `layer` of the stacked KV cache (`model.kv_cache`), their own keys
  and values already written.

  implementation: one of `CACHED_IMPLEMENTATIONS`: "chunked" (the loop of
  `cached.chunked_cached_attention`, blocks of `block`), "pallas" (one
  fused kernel, `pallas.cached`, on each device's part of the cache;
  NVIDIA GPUs), "pallas_interpret" (that kernel through the Pallas
  interpreter; tests), or "auto": the kernel for the prefill chunks it
  takes on an NVIDIA GPU, else "chunked". With a sliding `window` (see
  `layer_attention`) always "chunked", the one that applies it.
  """
  check_implementation(implementation, "cached attention",
                       CACHED_IMPLEMENTATIONS)
  if window is not None or softcap:  # (the kernel applies neither)
    return chunked_cached_attention(q_BCNH, k_LBKHS, v_LBKSH, layer, start,
                                    block=block, window=window,
                                    softcap=softcap)
  if implementation == "auto":
    implementation = ("pallas" if on_nvidia_gpu() and pallas_cached.takes(
        q_BCNH, v_LBKSH.shape[3]) else "chunked")
  if implementation == "chunked":
    return chunked_cached_attention(q_BCNH, k_LBKHS, v_LBKSH, layer, start,
                                    block=block)
  return on_each_device(functools.partial(
      pallas_cached.pallas_cached_attention,
      interpret=implementation == "pallas_interpret"))(
          q_BCNH, k_LBKHS, v_LBKSH, layer, start)
