"""Memory-efficient causal attention: flash-attention-2 in pure JAX.

The sequence is cut into blocks of `block_size` tokens. Each query block
visits the key blocks at or below the diagonal (those above are skipped, so
causal attention costs about half the square) with an online softmax, and
keeps its log-sum-exp. The backward pass (a `jax.custom_vjp`) recomputes the
probabilities block by block from that log-sum-exp. Neither pass holds more
than one `[block, block]` score tile per head, so memory grows linearly with
the sequence: 100k tokens fit where dense attention's seq^2 scores would not.
It is the portable path on CPU and the fallback on GPU.

Shapes: `q: [batch, seq, q_heads, head_dim]`, `k, v: [batch, seq, kv_heads,
head_dim]`. Query heads are handled as `[kv_heads, Q]` (Q = q_heads /
kv_heads), so K/V are never repeated. Softmax statistics, accumulators and
gradients accumulate in float32; the products take the input dtype.
"""

import functools

import jax
import jax.numpy as jnp

from longlora_jax.attention.masks import attention_mask, soft_cap
from longlora_jax.core.cpus import usable_cpus

# Score tiles of [512, 512] per head (1 MiB in float32): matmuls big enough
# to run efficiently on GPU, and on a CPU big enough for XLA to split each
# product over its threads, tiles small next to the O(seq) activations.
DEFAULT_BLOCK = 512
# On one CPU thread a head's tiles should stay in its caches: smaller tiles
# are faster there, for S²-Attn's groups and full attention alike (see
# BENCHMARKS.md, chunked attention's block on the CPU).
ONE_THREAD_BLOCK = 128


def default_block() -> int:
  """The block `chunked_causal_attention` takes on JAX's default backend:
  `ONE_THREAD_BLOCK` on a CPU that XLA runs on one thread (a process allowed
  one core), else `DEFAULT_BLOCK`."""
  if jax.default_backend() == "cpu" and usable_cpus() == 1:
    return ONE_THREAD_BLOCK
  return DEFAULT_BLOCK


def chunked_causal_attention(q_BTNH, k_BTKH, v_BTKH, *, segment_ids_BT=None,
                             block_size: int | None = None,
                             window: int | None = None,
                             softcap: float | None = None):
  """Causal attention with O(seq) memory in both passes ("chunked").

  Same result as `dense.dense_causal_attention`. The block is `block_size`
  (default `default_block()`),
  or the largest divisor of the sequence between half of it and it (100k
  tokens: 500), or the whole sequence when shorter. Otherwise the sequence
  is padded at the end, after every real token, so causality alone hides the
  padding (at the cost of padded copies of q, k, v).

  `window`: a sliding window (`masks.attention_mask`); a query block then
  visits only the key blocks its window reaches, so time and memory grow
  with seq * window. `softcap`: scores soft-capped, cap * tanh(s / cap)
  (Gemma 2), in both passes.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  if N % K:
    raise ValueError(f"q_heads={N} is not a multiple of kv_heads={K}")
  if block_size is None:
    block_size = default_block()
  if block_size < 1:
    raise ValueError(f"block_size={block_size} must be positive")
  block = _block_for(T, block_size)
  pad = -T % block
  if pad:
    pad_seq = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    q_BTNH, k_BTKH, v_BTKH = map(pad_seq, (q_BTNH, k_BTKH, v_BTKH))
    if segment_ids_BT is not None:
      segment_ids_BT = pad_seq(segment_ids_BT)
  # Head-major inside: a tile of one head is contiguous, so no product
  # re-lays out its operands.
  q_BKQTH = q_BTNH.reshape(B, T + pad, K, N // K, H).transpose(0, 2, 3, 1, 4)
  out_BKQTH = _flash(block, window, softcap, q_BKQTH,
                     k_BTKH.transpose(0, 2, 1, 3),
                     v_BTKH.transpose(0, 2, 1, 3), segment_ids_BT)
  out_BTKQH = out_BKQTH.transpose(0, 3, 1, 2, 4)
  return out_BTKQH.reshape(B, T + pad, N, H)[:, :T]


def _block_for(seq, block_size):
  if seq <= block_size:
    return seq
  divisors = [b for b in range(block_size, block_size // 2, -1) if seq % b == 0]
  return divisors[0] if divisors else block_size


def _tile(x, index, block, axis):
  return jax.lax.dynamic_slice_in_dim(x, index * block, block, axis=axis)


def _scores(q_BKQtH, k_BKsH, i, j, block, segment_ids_BT, masked,
            window=None, softcap=None, key_major=False):
  """Scaled float32 scores of query block i against key block j: `[batch,
  kv_heads, Q, t, s]` (t, s: the query and key blocks), or laid out
  `[batch, kv_heads, s, Q, t]` when `key_major`; -inf where the mask hides
  the key when `masked` (a tile below the diagonal and without documents
  hides none)."""
  if key_major:  # [B, K, s, Q, t]
    scores = jnp.einsum("BKsH,BKHQt->BKsQt", k_BKsH,
                        jnp.einsum("BKQtH->BKHQt", q_BKQtH),
                        preferred_element_type=jnp.float32)
  else:  # [B, K, Q, t, s]
    scores = jnp.einsum("BKQtH,BKsH->BKQts", q_BKQtH, k_BKsH,
                        preferred_element_type=jnp.float32)
  scores = soft_cap(scores * q_BKQtH.shape[-1] ** -0.5, softcap)
  if not masked:
    return scores
  mask_Bts = _tile_mask(i, j, block, segment_ids_BT, window)
  mask = (jnp.swapaxes(mask_Bts, 1, 2)[:, None, :, None] if key_major
          else mask_Bts[:, None, None])
  return jnp.where(mask, scores, -jnp.inf)


def _tile_mask(i, j, block, segment_ids_BT, window):
  """`[batch or 1, t, s]`: which keys of block j the queries of block i see."""
  pos = jnp.arange(block)
  seg_q = seg_k = None
  if segment_ids_BT is not None:
    seg_q = _tile(segment_ids_BT, i, block, 1)
    seg_k = _tile(segment_ids_BT, j, block, 1)
  # Positions relative to the key block: on the diagonal (i is j) the mask
  # is then a constant. A mask that depends on the block indices makes
  # XLA:CPU's select and exp over the tile about five times slower.
  return attention_mask((i - j) * block + pos, pos, seg_q, seg_k, window)


def _visit(i, j_lo, j_hi, segment_ids_BT, tile, carry, window=None):
  """Runs `tile(j, carry, masked)` over blocks [j_lo, j_hi), a range that
  holds the diagonal block i: the mask only where it can hide a key (with
  a window, every tile of the range: its edge may cross any of them)."""
  if segment_ids_BT is not None or window is not None:
    return jax.lax.fori_loop(j_lo, j_hi, functools.partial(tile, masked=True),
                             carry)
  below = lambda lo, hi, c: jax.lax.fori_loop(
      lo, hi, functools.partial(tile, masked=False), c)
  carry = below(j_lo, jnp.minimum(i, j_hi), carry)
  carry = tile(i, carry, masked=True)
  return below(jnp.maximum(i + 1, j_lo), j_hi, carry)


def _first_key_block(i, block, window):
  """The first key block a query block i sees (0 without a window)."""
  if window is None:
    return 0
  return jnp.maximum(0, (i * block - window + 1) // block)


def _last_query_block(j, block, window, n):
  """One past the last query block that sees key block j."""
  if window is None:
    return n
  return jnp.minimum(n, ((j + 1) * block + window - 2) // block + 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(block, window, softcap, q_BKQTH, k_BKTH, v_BKTH, segment_ids_BT):
  return _forward(block, window, softcap, q_BKQTH, k_BKTH, v_BKTH,
                  segment_ids_BT)[0]


def _forward(block, window, softcap, q_BKQTH, k_BKTH, v_BKTH, segment_ids_BT):
  """Output `[batch, kv_heads, Q, seq, head_dim]` and float32 log-sum-exp
  `[batch, kv_heads, Q, seq]`."""
  B, K, Q, T, H = q_BKQTH.shape
  n = T // block

  def query_block(i):
    q_BKQtH = _tile(q_BKQTH, i, block, 3)

    def key_block(j, carry, masked):
      m_BKQt, l_BKQt, acc_BKQtH = carry
      s_BKQts = _scores(q_BKQtH, _tile(k_BKTH, j, block, 2), i, j, block,
                        segment_ids_BT, masked, window, softcap)
      m_new = jnp.maximum(m_BKQt, s_BKQts.max(-1))
      # A row with no visible key yet (other segments only) keeps m = -inf;
      # shifting by 0 instead makes its weights exp(-inf) = 0, not NaN.
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p_BKQts = jnp.exp(s_BKQts - m_safe[..., None])
      correction = jnp.exp(m_BKQt - m_safe)
      l_BKQt = l_BKQt * correction + p_BKQts.sum(-1)
      acc_BKQtH = acc_BKQtH * correction[..., None] + jnp.einsum(
          "BKQts,BKsH->BKQtH", p_BKQts.astype(v_BKTH.dtype),
          _tile(v_BKTH, j, block, 2), preferred_element_type=jnp.float32)
      return m_new, l_BKQt, acc_BKQtH

    init = (jnp.full((B, K, Q, block), -jnp.inf), jnp.zeros((B, K, Q, block)),
            jnp.zeros((B, K, Q, block, H)))
    # Key blocks after the diagonal are never visited; each query sees its
    # own key in block i, so l > 0 at the end.
    m_BKQt, l_BKQt, acc_BKQtH = _visit(
        i, _first_key_block(i, block, window), i + 1, segment_ids_BT,
        key_block, init, window)
    out_BKQtH = acc_BKQtH / l_BKQt[..., None]
    return out_BKQtH.astype(q_BKQTH.dtype), m_BKQt + jnp.log(l_BKQt)

  out_nBKQtH, lse_nBKQt = jax.lax.map(query_block, jnp.arange(n))
  out_BKQTH = jnp.moveaxis(out_nBKQtH, 0, 3).reshape(B, K, Q, T, H)
  lse_BKQT = jnp.moveaxis(lse_nBKQt, 0, 3).reshape(B, K, Q, T)
  return out_BKQTH, lse_BKQT


def _flash_fwd(block, window, softcap, q_BKQTH, k_BKTH, v_BKTH,
               segment_ids_BT):
  out_BKQTH, lse_BKQT = _forward(block, window, softcap, q_BKQTH, k_BKTH,
                                 v_BKTH, segment_ids_BT)
  return out_BKQTH, (q_BKQTH, k_BKTH, v_BKTH, segment_ids_BT, out_BKQTH,
                     lse_BKQT)


def _flash_bwd(block, window, softcap, residuals, dout_BKQTH):
  """Flash-attention-2 backward: an outer loop over key blocks accumulates
  their dK and dV over the query blocks at or after them, and adds each
  tile's share of dQ into one float32 dQ (O(seq), updated in place).

  The tiles are key-major, `[s, Q, t]`, so each of the five products is a
  plain matrix product: only `[block, head_dim]` operands are transposed,
  never a `[block, block]` tile (on a CPU, XLA copies a transposed operand
  first, and copying the score tiles cost more than multiplying them)."""
  q_BKQTH, k_BKTH, v_BKTH, segment_ids_BT, out_BKQTH, lse_BKQT = residuals
  B, K, Q, T, H = q_BKQTH.shape
  n = T // block
  scale = H ** -0.5
  dtype = q_BKQTH.dtype
  # D = rowsum(dO * O), the softmax-Jacobian term shared by a row's tiles.
  delta_BKQT = jnp.einsum("BKQTH,BKQTH->BKQT", dout_BKQTH, out_BKQTH,
                          preferred_element_type=jnp.float32)
  rows = lambda x_BKQt: x_BKQt[:, :, None]  # [B, K, 1, Q, t] beside [s, Q, t]

  def key_block(dq_BKQTH, j):
    k_BKsH = _tile(k_BKTH, j, block, 2)
    v_BKsH = _tile(v_BKTH, j, block, 2)
    # A real transposed copy: XLA would fold a bare transpose into dQ's
    # product, which on a CPU then leaves YNNPACK's matmuls for a slower
    # path that has no bfloat16 x bfloat16 -> float32.
    kt_BKHs = jax.lax.optimization_barrier(jnp.einsum("BKsH->BKHs", k_BKsH))

    def query_block(i, carry, masked):
      dq_BKQTH, dk_BKsH, dv_BKsH = carry
      q_BKQtH = _tile(q_BKQTH, i, block, 3)
      do_BKQtH = _tile(dout_BKQTH, i, block, 3)
      s_BKsQt = _scores(q_BKQtH, k_BKsH, i, j, block, segment_ids_BT, masked,
                        window, softcap, key_major=True)
      p_BKsQt = jnp.exp(s_BKsQt - rows(_tile(lse_BKQT, i, block, 3)))
      dv_BKsH += jnp.einsum("BKsQt,BKQtH->BKsH", p_BKsQt.astype(dtype),
                            do_BKQtH, preferred_element_type=jnp.float32)
      dp_BKsQt = jnp.einsum("BKsH,BKHQt->BKsQt", v_BKsH,
                            jnp.einsum("BKQtH->BKHQt", do_BKQtH),
                            preferred_element_type=jnp.float32)
      ds_BKsQt = p_BKsQt * (dp_BKsQt - rows(_tile(delta_BKQT, i, block, 3)))
      if softcap:  # d(cap tanh(x / cap)) = 1 - tanh^2; 0 where masked
        ds_BKsQt *= jnp.where(jnp.isfinite(s_BKsQt),
                              1 - jnp.square(s_BKsQt / softcap), 0.0)
      ds_BKsQt = ds_BKsQt.astype(dtype)
      dk_BKsH += scale * jnp.einsum("BKsQt,BKQtH->BKsH", ds_BKsQt, q_BKQtH,
                                    preferred_element_type=jnp.float32)
      dq_BKHQt = jnp.einsum("BKHs,BKsQt->BKHQt", kt_BKHs, ds_BKsQt,
                            preferred_element_type=jnp.float32)
      dq_BKQtH = _tile(dq_BKQTH, i, block, 3) + scale * jnp.einsum(
          "BKHQt->BKQtH", dq_BKHQt)
      dq_BKQTH = jax.lax.dynamic_update_slice_in_dim(dq_BKQTH, dq_BKQtH,
                                                     i * block, axis=3)
      return dq_BKQTH, dk_BKsH, dv_BKsH

    zeros = jnp.zeros((B, K, block, H), jnp.float32)
    # Query blocks before the diagonal cannot see key block j: skipped.
    dq_BKQTH, dk_BKsH, dv_BKsH = _visit(
        j, j, _last_query_block(j, block, window, n), segment_ids_BT,
        query_block, (dq_BKQTH, zeros, zeros), window)
    # Complete after the inner loop: store in the input dtype.
    return dq_BKQTH, (dk_BKsH.astype(k_BKTH.dtype),
                      dv_BKsH.astype(v_BKTH.dtype))

  dq_BKQTH, (dk_nBKsH, dv_nBKsH) = jax.lax.scan(
      key_block, jnp.zeros((B, K, Q, T, H), jnp.float32), jnp.arange(n))
  unblock = lambda x_nBKsH: jnp.moveaxis(x_nBKsH, 0, 2).reshape(B, K, T, H)
  return dq_BKQTH.astype(dtype), unblock(dk_nBKsH), unblock(dv_nBKsH), None


_flash.defvjp(_flash_fwd, _flash_bwd)
