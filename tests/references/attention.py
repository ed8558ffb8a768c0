"""Brute-force float64 NumPy attention over explicit key sets, for tests.

Independent of longlora_jax on purpose: the S²-Attn groups are written down
from the LongLoRA paper and official code as lists of key positions, the
attention is a masked softmax with K/V repeated per query head, and the
gradient is derived by hand. `value_and_grads` runs the function under test.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def causal_keys(seq):
  """For each query position, the key positions full causal attention sees."""
  return [list(range(t + 1)) for t in range(seq)]


def window_keys(seq, window):
  """Per query, the keys a sliding window of `window` sees (itself and the
  window - 1 before it)."""
  return [list(range(max(0, t - window + 1), t + 1)) for t in range(seq)]


def s2_keys(seq, group, shifted, variant):
  """For each query position, the key positions an S²-Attn head sees.

  Unshifted heads: causal inside [0, G), [G, 2G), ... Shifted heads, "flash"
  (official cu_seqlens): causal inside [0, G/2), [G/2, 3G/2), ...,
  [seq - G/2, seq). Shifted heads, "roll" (paper, Algorithm 1): the order
  G/2, ..., seq-1, 0, ..., G/2-1 cut into groups of G, causal in that order,
  so the last group is the last G/2 tokens followed by the first G/2.
  """
  half = group // 2
  if shifted and variant == "roll":
    order = list(range(half, seq)) + list(range(half))
    keys = [None] * seq
    for r, t in enumerate(order):
      keys[t] = order[r // group * group:r + 1]
    return keys
  starts = list(range(0, seq, group)) if not shifted else [0] + list(
      range(half, seq, group))
  return [list(range(max(s for s in starts if s <= t), t + 1))
          for t in range(seq)]


def s2_head_keys(seq, group, heads, variant):
  """Per query head, `s2_keys`: the official code splits the heads with
  `chunk(2)`, so the first ceil(heads / 2) keep the groups and the last
  floor(heads / 2) are shifted."""
  unshifted = (heads + 1) // 2
  return [s2_keys(seq, group, h >= unshifted, variant) for h in range(heads)]


def mask_from_keys(keys_per_head, segment_ids=None, batch=1):
  """`[batch, heads, seq, seq]` bool from per-head key lists and documents."""
  heads, seq = len(keys_per_head), len(keys_per_head[0])
  mask = np.zeros((heads, seq, seq), bool)
  for h, keys in enumerate(keys_per_head):
    for t, ks in enumerate(keys):
      mask[h, t, ks] = True
  mask = np.broadcast_to(mask, (batch, heads, seq, seq))
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
  return mask


def attention(q, k, v, mask, dout=None, softcap=None):
  """Masked softmax attention in float64; with `dout`, also (dq, dk, dv).
  `softcap`: scores cap * tanh(s / cap) before the mask (Gemma 2).

  q: [batch, seq, q_heads, d]; k, v: [batch, seq, kv_heads, d];
  mask: [batch, q_heads, seq, seq]. Query head h reads kv head h // (q/kv).
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  rep = N // k.shape[2]
  kr, vr = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  scale = 1.0 / np.sqrt(H)
  s = np.einsum("btnh,bsnh->bnts", q, kr) * scale
  slope = 1.0  # d(capped)/d(s)
  if softcap:
    t = np.tanh(s / softcap)
    s, slope = softcap * t, 1 - t * t
  s = np.where(mask, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bnts,bsnh->btnh", p, vr)
  if dout is None:
    return out
  dout = np.asarray(dout, np.float64)
  dp = np.einsum("btnh,bsnh->bnts", dout, vr)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * slope
  dq = np.einsum("bnts,bsnh->btnh", ds, kr) * scale
  dk = np.einsum("bnts,btnh->bsnh", ds, q) * scale
  dv = np.einsum("bnts,btnh->bsnh", p, dout)
  per_kv = lambda x: x.reshape(B, T, N // rep, rep, H).sum(3)
  return out, (dq, per_kv(dk), per_kv(dv))


def random_qkv(rng, batch, seq, q_heads, kv_heads, head_dim):
  """Queries scaled up so the softmax is far from uniform."""
  q = 2.0 * rng.standard_normal((batch, seq, q_heads, head_dim))
  k = rng.standard_normal((batch, seq, kv_heads, head_dim))
  v = rng.standard_normal((batch, seq, kv_heads, head_dim))
  return q, k, v


def random_segments(rng, batch, seq, docs=3):
  """Sorted document ids per row (packed documents)."""
  return np.sort(rng.integers(0, docs, (batch, seq)), axis=1).astype(np.int32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def value_and_grads(attention_fn, options, q, k, v, w, segment_ids=None):
  """An attention function's output and the gradients of sum(output * w)
  with respect to q, k, v; `options`: hashable (name, value) keyword pairs."""
  def loss(q, k, v):
    out = attention_fn(q, k, v, segment_ids_BT=segment_ids, **dict(options))
    return jnp.sum(out.astype(jnp.float32) * w), out
  (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def assert_close(got, want, *, atol=0.0, relative=None):
  """`got` within atol of `want`, or within relative * max|want|."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  err = np.abs(got - want).max()
  bound = atol if relative is None else relative * np.abs(want).max()
  assert err <= bound, f"max error {err:.3g} > {bound:.3g}"
