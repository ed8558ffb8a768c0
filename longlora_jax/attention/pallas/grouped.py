"""Causal attention in groups by the fused Pallas kernels (GPU Triton
backend), forward and backward: S²-Attn's groups, full attention as one
group, and a device's window of a longer sequence.

The kernels read the model's own `q: [batch, seq, q_heads, head_dim]` and
`k, v: [batch, seq, kv_heads, head_dim]` in place: no transposes, rolls,
head splits or repeated K/V in HBM. The S² groups (`attention.groups`) are
index arithmetic (`blocks`): query head h uses groups starting at 0 if
h < q_heads / 2, else at G/2 (first group [0, G/2)); "roll" adds, for the
shifted heads' first G/2 queries, the wrapped keys [seq - G/2, seq). With no
shift and G = seq every head is plain causal attention
(`pallas_causal_attention`). Under context parallelism the same kernels run
on a device's window of a longer sequence (`pallas_window_attention`: T
queries over [halo; own] keys, group boundaries and the sequence start
read from int32 scalars, so one compile serves every device).

Flash-attention-2 in three kernels (plus an XLA reduction for
D = rowsum(dO * O)):

  forward  grid (query block, batch, query head). Online softmax in float32
           over the key blocks that hold the block's keys, in base 2 (exp2,
           log2(e) folded into the scale); saves lse = log2-sum-exp.
  dQ       same grid and key blocks; recomputes P from lse.
  dK/dV    grid (key block, batch, kv head). Loops over the Q = q_heads /
           kv_heads query heads sharing the kv head, and for each over the
           query blocks that see the key block, accumulating dK and dV in
           float32 registers, in key-major tiles (P^T, dS^T) so that no
           register tile is transposed; each dK/dV block is written once.
           No atomics,
           no per-query-head dK/dV buffer, no reduction afterwards; the cost
           is Q-way less parallelism in that kernel (Q = 1 for Llama-2 7B).

Key (query) blocks outside a head's groups are never loaded: K/V arrive as
pointers to the whole sequence of one kv head (the index map picks kv head
h // Q) and the loops run over computed block ranges. Tiles entirely inside
a group and below the diagonal skip the mask; the others apply it.

Constraints (checked, ValueError): head_dim in `HEAD_DIMS`; q, k, v of one
dtype; q_heads a multiple of kv_heads; every block a power of two >= 16
(Triton tile shapes). Any seq: when the blocks do not divide it (100,000
tokens), q, k and v are padded at the end to a multiple of them, which costs
a copy of each (and of the gradients) but no change to the result. None on
G beyond `s2_group_size` (even, divides seq): a block may hold several
groups (G < block) or cross a group border (G/2 not a multiple of the
block); such tiles are masked, so they cost compute, not correctness. The
fastest case is G/2 a multiple of every block (e.g. G = 2048, blocks <= 128).
Packed documents (`segment_ids_BT`) are not supported.

`interpret=True` runs the same kernels through the Pallas interpreter on any
backend (slow; for tests on CPU). The Triton backend is deprecated in jax
0.11 (Mosaic GPU and jax-triton replace it); this subpackage is the only
place that knows about it, behind the attention signature, so another kernel
can replace it. If Pallas Triton cannot be imported, `AVAILABLE` is False and
the entry points raise ImportError when called; importing longlora_jax still
works.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from longlora_jax.attention.groups import (SHIFTED, check_variant,
                                           s2_group_size)
from longlora_jax.attention.pallas.blocks import Groups
from longlora_jax.attention.pallas.flash import (AVAILABLE, HEAD_DIMS,
                                                 IMPORT_ERROR, dkv_kernel,
                                                 dq_kernel, forward_kernel,
                                                 pl, plgpu)

_MIN_BLOCK = 16  # Triton's smallest dot tile


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Tile sizes in tokens and Triton launch parameters.

  `block_q`/`block_k`: forward tiles. `block_q_dkv`/`block_k_dkv`: dK/dV
  kernel (one key block per program, loops over query blocks).
  `block_q_dq`/`block_k_dq`: dQ kernel (one query block per program).
  Defaults (`default_config`) start from the Triton fused-attention tutorial
  and jax's Pallas GPU attention, with dK/dV key blocks of 64 so that its two
  float32 accumulators fit in registers: all three kernels compile for sm_90
  without register spills (checked offline with Triton 3.9 and ptxas, no
  GPU). `eval.gpu_check` times alternatives (its tile sweep); for timings
  see BENCHMARKS.md, attention kernels, and docs/kernels.md.
  """
  block_q: int = 128
  block_k: int = 64
  block_q_dkv: int = 32
  block_k_dkv: int = 64
  block_q_dq: int = 128
  block_k_dq: int = 32
  num_warps: int = 4
  num_stages: int = 3
  num_warps_bwd: int = 4
  num_stages_bwd: int = 3

  def blocks(self) -> dict[str, int]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name.startswith("block_")}


def default_config(head_dim: int, dtype=jnp.bfloat16) -> BlockConfig:
  """Defaults per head_dim and dtype: 128 doubles the warps so the float32
  accumulators ([block, head_dim] each) stay in registers. Float32 inputs
  at 128 take fewer pipeline stages so that every kernel fits an A100's
  166,912 bytes of shared memory per block, at "highest" matmul precision
  too (three forward stages ask for 196,608, two backward ones 180,224;
  compiled for an A100 without one)."""
  _check_head_dim(head_dim)
  if head_dim == 64:
    return BlockConfig()
  if jnp.dtype(dtype).itemsize == 4:
    return BlockConfig(num_warps=8, num_stages=2, num_warps_bwd=8,
                       num_stages_bwd=1)
  return BlockConfig(num_warps=8, num_warps_bwd=8, num_stages_bwd=2)


def pallas_s2_attention(q_BTNH, k_BTKH, v_BTKH, *,
                        group_size: int | None = None,
                        group_ratio: float = 0.25, variant: str = "flash",
                        segment_ids_BT=None,
                        config: BlockConfig | None = None,
                        interpret: bool = False,
                        softcap: float | None = None):
  """S²-Attn by the fused kernels; same result as `s2_attention`.

  Args:
    q_BTNH: `[batch, seq, q_heads, head_dim]`; k_BTKH, v_BTKH: `[batch,
      seq, kv_heads, head_dim]` (query head h reads kv head h // Q).
    group_size, group_ratio, variant: as in `s2_attention`.
    segment_ids_BT: must be None (ValueError otherwise): no packed documents.
    config: tiles and launch parameters; default `default_config(head_dim,
      dtype)`.
    interpret: run through the Pallas interpreter (any backend, slow).
    softcap: scores soft-capped, cap * tanh(s / cap) (Gemma 2).
  Returns:
    `[batch, seq, q_heads, head_dim]` in q's dtype.
  """
  _check_no_segments(segment_ids_BT)
  T, N = q_BTNH.shape[1:3]
  G = s2_group_size(T, group_size, group_ratio)
  check_variant(variant, SHIFTED)
  groups = Groups(seq=T, size=G, shift=G // 2, wrap=variant == "roll",
                  heads=N)
  return _attention(q_BTNH, k_BTKH, v_BTKH, groups, groups.scalars(), config,
                    interpret, softcap=softcap)


def pallas_causal_attention(q_BTNH, k_BTKH, v_BTKH, *, segment_ids_BT=None,
                            config: BlockConfig | None = None,
                            interpret: bool = False,
                            softcap: float | None = None):
  """Plain causal flash attention by the same kernels (one group of seq
  tokens, no shift), with the attention signature; e.g. for evaluation.

  Raises ValueError if `segment_ids_BT` is given: the kernels do not support
  packed documents (use "chunked" attention for them).
  """
  _check_no_segments(segment_ids_BT)
  T, N = q_BTNH.shape[1:3]
  groups = Groups(seq=T, size=T, shift=0, wrap=False, heads=N)
  return _attention(q_BTNH, k_BTKH, v_BTKH, groups, groups.scalars(), config,
                    interpret, softcap=softcap)


def pallas_window_attention(q_BTNH, k_BSKH, v_BSKH, *, q_start, origin,
                            group_size: int, shifted: bool = True,
                            segment_ids_BT=None,
                            config: BlockConfig | None = None,
                            interpret: bool = False):
  """S²-Attn (or causal attention) of T queries over a window of S >= T
  keys cut from a longer sequence, as context parallelism needs
  (`context`): key j sits at global position `origin` + j, query i at key
  index `q_start` + i (both int32 scalars, may be traced; q_start <= S - T).
  Groups of `group_size` start at global multiples of it, for the last
  floor(q_heads / 2) heads shifted by group_size / 2 if `shifted`; keys
  before global position 0 are never seen. One group as long as the
  sequence gives plain causal attention. `segment_ids_BT` must be None."""
  _check_no_segments(segment_ids_BT)
  N = q_BTNH.shape[2]
  groups = Groups(seq=k_BSKH.shape[1], size=group_size,
                  shift=group_size // 2 if shifted else 0, wrap=False,
                  heads=N)
  return _attention(q_BTNH, k_BSKH, v_BSKH, groups,
                    groups.scalars(q_start, origin), config, interpret,
                    window=True)


def _attention(q_BTNH, k_BSKH, v_BSKH, groups, scalars, config, interpret,
               window=False, softcap=None):
  """The kernels on q padded at the end to a multiple of the blocks, and
  k, v to one that holds the last padded query's keys.

  Padding never reaches a real token: a real query sees no later key (the
  roll variant's wrapped keys stop at `groups.seq`), and the padded queries'
  rows of dO are zero, so they add nothing to dK and dV.
  """
  if not AVAILABLE:
    raise ImportError(f"Pallas Triton is not available in this jax "
                      f"({jax.__version__}): {IMPORT_ERROR}")
  config, padded = _checked_config(q_BTNH, k_BSKH, v_BSKH, config, window)
  T, S = q_BTNH.shape[1], k_BSKH.shape[1]
  largest = max(config.blocks().values())
  keys = -(-(S + padded - T) // largest) * largest
  pad = lambda x, n: x if n == x.shape[1] else jnp.pad(
      x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
  out_BTNH = _fused(pad(q_BTNH, padded), pad(k_BSKH, keys), pad(v_BSKH, keys),
                    scalars, groups, config, bool(interpret), softcap)
  return out_BTNH if padded == T else out_BTNH[:, :T]


def _checked_config(q_BTNH, k_BSKH, v_BSKH, config, window):
  """(config with blocks clamped to the padded length, padded length: the
  queries rounded up to a multiple of every block); ValueError on what the
  kernels cannot run."""
  B, T, N, H = q_BTNH.shape
  if k_BSKH.shape != v_BSKH.shape or k_BSKH.shape[0] != B or (
      k_BSKH.shape[1] < T if window else k_BSKH.shape[1] != T) or (
      k_BSKH.shape[3] != H):
    raise ValueError(f"k {k_BSKH.shape} and v {v_BSKH.shape} must be "
                     f"[batch, seq, kv_heads, head_dim] like q {q_BTNH.shape}")
  if not q_BTNH.dtype == k_BSKH.dtype == v_BSKH.dtype:
    raise ValueError(f"q, k, v need one dtype; got {q_BTNH.dtype}, "
                     f"{k_BSKH.dtype}, {v_BSKH.dtype}")
  if N % k_BSKH.shape[2]:
    raise ValueError(f"q_heads={N} is not a multiple of "
                     f"kv_heads={k_BSKH.shape[2]}")
  _check_head_dim(H)
  config = config or default_config(H, q_BTNH.dtype)
  for name, block in config.blocks().items():
    if block < _MIN_BLOCK or block & (block - 1):
      raise ValueError(f"{name}={block} must be a power of two >= "
                       f"{_MIN_BLOCK}")
  # Blocks are powers of two: a multiple of the largest is one of all. A
  # short sequence pads to a power of two and the blocks shrink to it.
  largest = max(config.blocks().values())
  padded = (-(-T // largest) * largest if T > largest
            else max(_MIN_BLOCK, 1 << (T - 1).bit_length()))
  config = dataclasses.replace(
      config, **{name: min(b, padded) for name, b in config.blocks().items()})
  return config, padded


def _check_no_segments(segment_ids_BT):
  if segment_ids_BT is not None:
    raise ValueError("the Pallas attention kernels do not support "
                     "segment_ids_BT (packed documents); use the 'chunked' "
                     "or 'dense' implementations for them")


def _check_head_dim(head_dim):
  if head_dim not in HEAD_DIMS:
    raise ValueError(f"the Pallas S²-Attn kernel supports head_dim in "
                     f"{HEAD_DIMS}; got {head_dim}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused(q_BTNH, k_BSKH, v_BSKH, scalars, groups, config, interpret,
           softcap):
  return _forward(q_BTNH, k_BSKH, v_BSKH, scalars, groups, config,
                  interpret, softcap)[0]


def _forward(q_BTNH, k_BSKH, v_BSKH, scalars, groups, config, interpret,
             softcap=None):
  """Output `[batch, T, q_heads, head_dim]` and float32 base-2
  log-sum-exp `[batch, q_heads, T]`."""
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1:3]
  bq = config.block_q
  query_spec = pl.BlockSpec((None, bq, None, H), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, S, None, H),
                         lambda i, b, h: (b, 0, lax.div(h, N // K), 0))
  return pl.pallas_call(
      functools.partial(forward_kernel, groups=groups,
                        block_k=config.block_k, softcap=softcap),
      grid=(T // bq, B, N),
      in_specs=[_whole(scalars), query_spec, kv_spec, kv_spec],
      out_specs=[query_spec,
                 pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q_BTNH.shape, q_BTNH.dtype),
                 jax.ShapeDtypeStruct((B, N, T), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
      name="grouped_attention_forward",
  )(scalars, q_BTNH, k_BSKH, v_BSKH)


def _whole(x):
  """The BlockSpec that gives every program all of `x`."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _fused_fwd(q_BTNH, k_BSKH, v_BSKH, scalars, groups, config, interpret,
               softcap):
  out_BTNH, lse_BNT = _forward(q_BTNH, k_BSKH, v_BSKH, scalars, groups,
                               config, interpret, softcap)
  return out_BTNH, (q_BTNH, k_BSKH, v_BSKH, scalars, out_BTNH, lse_BNT)


def _fused_bwd(groups, config, interpret, softcap, residuals, do_BTNH):
  q_BTNH, k_BSKH, v_BSKH, scalars, out_BTNH, lse_BNT = residuals
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1:3]
  Q = N // K
  do_BTNH = do_BTNH.astype(q_BTNH.dtype)
  # D = rowsum(dO * O): one fused XLA reduction, O(batch * seq * heads).
  delta_BNT = jnp.swapaxes(
      (do_BTNH.astype(jnp.float32) * out_BTNH.astype(jnp.float32)).sum(-1),
      1, 2)
  params = plgpu.CompilerParams(num_warps=config.num_warps_bwd,
                                num_stages=config.num_stages_bwd)

  bq = config.block_q_dq
  query_spec = pl.BlockSpec((None, bq, None, H), lambda i, b, h: (b, i, h, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
  kv_spec = pl.BlockSpec((None, S, None, H),
                         lambda i, b, h: (b, 0, lax.div(h, Q), 0))
  dq_BTNH = pl.pallas_call(
      functools.partial(dq_kernel, groups=groups, block_k=config.block_k_dq,
                        softcap=softcap),
      grid=(T // bq, B, N),
      in_specs=[_whole(scalars), query_spec, kv_spec, kv_spec, query_spec,
                row_spec, row_spec],
      out_specs=query_spec,
      out_shape=jax.ShapeDtypeStruct(q_BTNH.shape, q_BTNH.dtype),
      compiler_params=params, interpret=interpret,
      name="grouped_attention_dq",
  )(scalars, q_BTNH, k_BSKH, v_BSKH, do_BTNH, lse_BNT, delta_BNT)

  bk = config.block_k_dkv
  # One program per kv head sees all Q query heads that read it.
  heads_spec = pl.BlockSpec((None, T, Q, H), lambda j, b, g: (b, 0, g, 0))
  rows_spec = pl.BlockSpec((None, Q, T), lambda j, b, g: (b, g, 0))
  key_spec = pl.BlockSpec((None, bk, None, H), lambda j, b, g: (b, j, g, 0))
  dk_BSKH, dv_BSKH = pl.pallas_call(
      functools.partial(dkv_kernel, groups=groups,
                        block_q=config.block_q_dkv, softcap=softcap),
      grid=(S // bk, B, K),
      in_specs=[_whole(scalars), heads_spec, key_spec, key_spec, heads_spec,
                rows_spec, rows_spec],
      out_specs=[key_spec, key_spec],
      out_shape=[jax.ShapeDtypeStruct(k_BSKH.shape, k_BSKH.dtype),
                 jax.ShapeDtypeStruct(v_BSKH.shape, v_BSKH.dtype)],
      compiler_params=params, interpret=interpret,
      name="grouped_attention_dkv",
  )(scalars, q_BTNH, k_BSKH, v_BSKH, do_BTNH, lse_BNT, delta_BNT)
  return dq_BTNH, dk_BSKH, dv_BSKH, None


_fused.defvjp(_fused_fwd, _fused_bwd)
