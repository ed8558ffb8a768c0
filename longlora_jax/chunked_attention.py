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
head_dim]`. Query heads are handled as `[kv_heads, group]` (R = q_heads /
kv_heads), so K/V are never repeated. Softmax statistics, accumulators and
gradients accumulate in float32; the products take the input dtype.
"""

import functools

import jax
import jax.numpy as jnp

from longlora_jax.attention import attention_mask

# Score tiles of [512, 512] per head (1 MiB in float32): matmuls big enough
# to run efficiently on GPU, tiles small next to the O(seq) activations.
DEFAULT_BLOCK = 512


def chunked_causal_attention(q_BTNH, k_BTKH, v_BTKH, *, segment_ids_BT=None,
                             block_size: int = DEFAULT_BLOCK):
  """Causal attention with O(seq) memory in both passes ("chunked").

  Same result as `attention.causal_attention`. The block is `block_size`,
  or the largest divisor of the sequence between half of it and it (100k
  tokens: 500), or the whole sequence when shorter. Otherwise the sequence
  is padded at the end, after every real token, so causality alone hides the
  padding (at the cost of padded copies of q, k, v).
  """
  B, T, N, H = q_BTNH.shape
  K = k_BTKH.shape[2]
  if N % K:
    raise ValueError(f"q_heads={N} is not a multiple of kv_heads={K}")
  if block_size < 1:
    raise ValueError(f"block_size={block_size} must be positive")
  block = _block_for(T, block_size)
  pad = -T % block
  if pad:
    pad_seq = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    q_BTNH, k_BTKH, v_BTKH = map(pad_seq, (q_BTNH, k_BTKH, v_BTKH))
    if segment_ids_BT is not None:
      segment_ids_BT = pad_seq(segment_ids_BT)
  q_BTKRH = q_BTNH.reshape(B, T + pad, K, N // K, H)
  out_BTKRH = _flash(block, q_BTKRH, k_BTKH, v_BTKH, segment_ids_BT)
  return out_BTKRH.reshape(B, T + pad, N, H)[:, :T]


def _block_for(seq, block_size):
  if seq <= block_size:
    return seq
  divisors = [b for b in range(block_size, block_size // 2, -1) if seq % b == 0]
  return divisors[0] if divisors else block_size


def _tile(x, index, block, axis):
  return jax.lax.dynamic_slice_in_dim(x, index * block, block, axis=axis)


def _masked_scores(q_BqKRH, k_BkKH, i, j, block, segment_ids_BT):
  """Scaled float32 scores of query block i against key block j, -inf where
  the mask hides the key: `[batch, kv_heads, R, q_block, k_block]`."""
  H = q_BqKRH.shape[-1]
  s_BKRqk = jnp.einsum("BqKRH,BkKH->BKRqk", q_BqKRH, k_BkKH,
                       preferred_element_type=jnp.float32) * (H ** -0.5)
  pos = jnp.arange(block)
  seg_q = seg_k = None
  if segment_ids_BT is not None:
    seg_q = _tile(segment_ids_BT, i, block, 1)
    seg_k = _tile(segment_ids_BT, j, block, 1)
  mask_Bqk = attention_mask(i * block + pos, j * block + pos, seg_q, seg_k)
  return jnp.where(mask_Bqk[:, None, None], s_BKRqk, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(block, q_BTKRH, k_BTKH, v_BTKH, segment_ids_BT):
  return _forward(block, q_BTKRH, k_BTKH, v_BTKH, segment_ids_BT)[0]


def _forward(block, q_BTKRH, k_BTKH, v_BTKH, segment_ids_BT):
  """Output `[batch, seq, kv_heads, R, head_dim]` and float32 log-sum-exp
  `[batch, kv_heads, R, seq]`."""
  B, T, K, R, H = q_BTKRH.shape
  n = T // block

  def query_block(i):
    q_BqKRH = _tile(q_BTKRH, i, block, 1)

    def key_block(j, carry):
      m_BKRq, l_BKRq, acc_BKRqH = carry
      s_BKRqk = _masked_scores(q_BqKRH, _tile(k_BTKH, j, block, 1), i, j,
                               block, segment_ids_BT)
      m_new = jnp.maximum(m_BKRq, s_BKRqk.max(-1))
      # A row with no visible key yet (other segments only) keeps m = -inf;
      # shifting by 0 instead makes its weights exp(-inf) = 0, not NaN.
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p_BKRqk = jnp.exp(s_BKRqk - m_safe[..., None])
      correction = jnp.exp(m_BKRq - m_safe)
      l_BKRq = l_BKRq * correction + p_BKRqk.sum(-1)
      acc_BKRqH = acc_BKRqH * correction[..., None] + jnp.einsum(
          "BKRqk,BkKH->BKRqH", p_BKRqk.astype(v_BTKH.dtype),
          _tile(v_BTKH, j, block, 1), preferred_element_type=jnp.float32)
      return m_new, l_BKRq, acc_BKRqH

    init = (jnp.full((B, K, R, block), -jnp.inf), jnp.zeros((B, K, R, block)),
            jnp.zeros((B, K, R, block, H)))
    # Key blocks after the diagonal are never visited; each query sees its
    # own key in block i, so l > 0 at the end.
    m_BKRq, l_BKRq, acc_BKRqH = jax.lax.fori_loop(0, i + 1, key_block, init)
    out_BqKRH = (acc_BKRqH / l_BKRq[..., None]).transpose(0, 3, 1, 2, 4)
    return out_BqKRH.astype(q_BTKRH.dtype), m_BKRq + jnp.log(l_BKRq)

  out_nBqKRH, lse_nBKRq = jax.lax.map(query_block, jnp.arange(n))
  out_BTKRH = jnp.moveaxis(out_nBqKRH, 0, 1).reshape(B, T, K, R, H)
  lse_BKRT = jnp.moveaxis(lse_nBKRq, 0, 3).reshape(B, K, R, T)
  return out_BTKRH, lse_BKRT


def _flash_fwd(block, q_BTKRH, k_BTKH, v_BTKH, segment_ids_BT):
  out_BTKRH, lse_BKRT = _forward(block, q_BTKRH, k_BTKH, v_BTKH,
                                 segment_ids_BT)
  return out_BTKRH, (q_BTKRH, k_BTKH, v_BTKH, segment_ids_BT, out_BTKRH,
                     lse_BKRT)


def _flash_bwd(block, residuals, dout_BTKRH):
  """Flash-attention-2 backward: an outer loop over key blocks accumulates
  their dK and dV over the query blocks at or after them, and adds each
  tile's share of dQ into one float32 dQ (O(seq), updated in place)."""
  q_BTKRH, k_BTKH, v_BTKH, segment_ids_BT, out_BTKRH, lse_BKRT = residuals
  B, T, K, R, H = q_BTKRH.shape
  n = T // block
  scale = H ** -0.5
  dtype = q_BTKRH.dtype
  # D = rowsum(dO * O), the softmax-Jacobian term shared by a row's tiles.
  delta_BKRT = jnp.einsum("BTKRH,BTKRH->BKRT", dout_BTKRH, out_BTKRH,
                          preferred_element_type=jnp.float32)

  def key_block(dq_BTKRH, j):
    k_BkKH = _tile(k_BTKH, j, block, 1)
    v_BkKH = _tile(v_BTKH, j, block, 1)

    def query_block(i, carry):
      dq_BTKRH, dk_BkKH, dv_BkKH = carry
      q_BqKRH = _tile(q_BTKRH, i, block, 1)
      do_BqKRH = _tile(dout_BTKRH, i, block, 1)
      s_BKRqk = _masked_scores(q_BqKRH, k_BkKH, i, j, block, segment_ids_BT)
      p_BKRqk = jnp.exp(s_BKRqk - _tile(lse_BKRT, i, block, 3)[..., None])
      dv_BkKH += jnp.einsum("BKRqk,BqKRH->BkKH", p_BKRqk.astype(dtype),
                            do_BqKRH, preferred_element_type=jnp.float32)
      dp_BKRqk = jnp.einsum("BqKRH,BkKH->BKRqk", do_BqKRH, v_BkKH,
                            preferred_element_type=jnp.float32)
      ds_BKRqk = (p_BKRqk * (dp_BKRqk - _tile(delta_BKRT, i, block, 3)[..., None])
                  ).astype(dtype)
      dk_BkKH += scale * jnp.einsum("BKRqk,BqKRH->BkKH", ds_BKRqk, q_BqKRH,
                                    preferred_element_type=jnp.float32)
      dq_BqKRH = _tile(dq_BTKRH, i, block, 1) + scale * jnp.einsum(
          "BKRqk,BkKH->BqKRH", ds_BKRqk, k_BkKH,
          preferred_element_type=jnp.float32)
      dq_BTKRH = jax.lax.dynamic_update_slice_in_dim(dq_BTKRH, dq_BqKRH,
                                                     i * block, axis=1)
      return dq_BTKRH, dk_BkKH, dv_BkKH

    zeros = jnp.zeros((B, block, K, H), jnp.float32)
    # Query blocks before the diagonal cannot see key block j: skipped.
    dq_BTKRH, dk_BkKH, dv_BkKH = jax.lax.fori_loop(
        j, n, query_block, (dq_BTKRH, zeros, zeros))
    # Complete after the inner loop: store in the input dtype.
    return dq_BTKRH, (dk_BkKH.astype(k_BTKH.dtype),
                      dv_BkKH.astype(v_BTKH.dtype))

  dq_BTKRH, (dk_nBkKH, dv_nBkKH) = jax.lax.scan(
      key_block, jnp.zeros((B, T, K, R, H), jnp.float32), jnp.arange(n))
  unblock = lambda x_nBkKH: jnp.moveaxis(x_nBkKH, 0, 1).reshape(B, T, K, H)
  return dq_BTKRH.astype(dtype), unblock(dk_nBkKH), unblock(dv_nBkKH), None


_flash.defvjp(_flash_fwd, _flash_bwd)
