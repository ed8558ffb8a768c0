"""Causal-LM cross-entropy computed over sequence chunks.

At 100k tokens and a 32k vocabulary the float32 logits alone are 12.8 GB, so
they are never materialised: each chunk's logits are made, reduced to a loss
and dropped. Under differentiation a chunk's gradient with respect to its
hidden states is made right there, while its logits exist, and kept instead
of them (its size is the chunk's hidden states'): the LM head then runs
twice per chunk (logits, and their gradient), not three times as when the
backward pass recomputes the logits. Only a trained LM head (full
fine-tuning, or an embedding tied to it and trained) keeps the chunk's
inputs and recomputes its logits in the backward pass, where the head's own
gradient is summed.
"""

import functools

import jax
import jax.numpy as jnp

from longlora_jax.model.config import LlamaConfig
from longlora_jax.model.llama import lm_head, lm_head_params
from longlora_jax.parallel.sharding import context_slices, shard_batch

IGNORE_INDEX = -100


def next_token_targets(labels_BT):
  """Labels shifted left by one (position t predicts token t+1), as HF does.

  The last position has no target and gets IGNORE_INDEX.
  """
  pad = jnp.full_like(labels_BT[:, :1], IGNORE_INDEX)
  return jnp.concatenate([labels_BT[:, 1:], pad], axis=1)


def chunked_cross_entropy(config: LlamaConfig, params, h_BTD, targets_BT, *,
                          chunk_size: int = 2048):
  """Per row: (sum of token losses, number of scored tokens), float32 `[batch]`.

  Args:
    h_BTD: final hidden states (`model.hidden_states`).
    targets_BT: the token each position must predict; IGNORE_INDEX (-100)
      positions are not scored (`next_token_targets` makes these from labels).
    chunk_size: positions per chunk; the sequence (each context slice) is
      padded to a multiple.
  """
  B, T, D = h_BTD.shape
  # Chunks of each context slice (`sharding.context_slices`), so the scan
  # runs over local chunks and the P axis stays split over devices.
  P = context_slices()
  chunk = min(chunk_size, T // P)
  pad = -(T // P) % chunk
  h_BPTD = h_BTD.reshape(B, P, T // P, D)
  targets_BPT = targets_BT.reshape(B, P, T // P)
  if pad:
    h_BPTD = jnp.pad(h_BPTD, ((0, 0), (0, 0), (0, pad), (0, 0)))
    targets_BPT = jnp.pad(targets_BPT, ((0, 0), (0, 0), (0, pad)),
                          constant_values=IGNORE_INDEX)
  n = (T // P + pad) // chunk
  h_cBPCD = jnp.moveaxis(h_BPTD.reshape(B, P, n, chunk, D), 2, 0)
  targets_cBPC = jnp.moveaxis(targets_BPT.reshape(B, P, n, chunk), 2, 0)

  head = lm_head_params(config, params)

  def chunk_loss(h_BPCD, targets_BPC):
    h_BCD = shard_batch(h_BPCD).reshape(B, P * chunk, D)
    targets_BC = targets_BPC.reshape(B, P * chunk)
    return (_token_loss_sum(config, head, h_BCD, targets_BC),
            jnp.sum(targets_BC != IGNORE_INDEX, -1))

  def step(carry, xs):
    loss, count = chunk_loss(*xs)
    return (carry[0] + loss, carry[1] + count), None

  init = (jnp.zeros((B,), jnp.float32), jnp.zeros((B,), jnp.int32))
  (loss_sum, count), _ = jax.lax.scan(step, init, (h_cBPCD, targets_cBPC))
  return loss_sum, count.astype(jnp.float32)


def _chunk_nll(config, head, h_BCD, targets_BC):
  """Per row, the sum of the chunk's token losses (float32 `[batch]`)."""
  logits_BCV = lm_head(config, head, h_BCD)
  valid_BC = targets_BC != IGNORE_INDEX
  target_logit_BC = jnp.take_along_axis(
      logits_BCV, jnp.where(valid_BC, targets_BC, 0)[..., None], axis=-1)[..., 0]
  nll_BC = jax.nn.logsumexp(logits_BCV, axis=-1) - target_logit_BC
  return jnp.sum(jnp.where(valid_BC, nll_BC, 0.0), -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _token_loss_sum(config, head, h_BCD, targets_BC):
  return _chunk_nll(config, head, h_BCD, targets_BC)


def _token_loss_sum_fwd(config, head, h_BCD, targets_BC):
  # With symbolic zeros, each input leaf comes as (value, perturbed).
  head_trained = any(x.perturbed for x in jax.tree.leaves(head))
  head, h_BCD, targets_BC = jax.tree.map(lambda x: x.value,
                                         (head, h_BCD, targets_BC))
  if head_trained:  # keep the inputs; the backward pass recomputes
    return (_chunk_nll(config, head, h_BCD, targets_BC),
            (None, head, h_BCD, targets_BC))
  loss_B, vjp = jax.vjp(
      lambda h: _chunk_nll(config, head, h, targets_BC), h_BCD)
  dh_BCD, = vjp(jnp.ones_like(loss_B))  # d(row's loss) / d(its states)
  return loss_B, (dh_BCD, None, None, None)


def _token_loss_sum_bwd(config, residuals, g_B):
  dh_BCD, head, h_BCD, targets_BC = residuals
  if dh_BCD is None:
    _, vjp = jax.vjp(lambda p, h: _chunk_nll(config, p, h, targets_BC),
                     head, h_BCD)
    return (*vjp(g_B), None)
  # Each row's loss depends on its own states only: scaling by its
  # cotangent is the whole backward pass.
  dh_BCD = (g_B[:, None, None] * dh_BCD).astype(dh_BCD.dtype)
  return None, dh_BCD, None


_token_loss_sum.defvjp(_token_loss_sum_fwd, _token_loss_sum_bwd,
                       symbolic_zeros=True)
