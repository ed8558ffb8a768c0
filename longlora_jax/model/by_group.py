"""A layer's attention block (input norm, q/k/v, S²-Attn, o) one S² group
at a time (`attention.by_group`): its activations and their gradients
exist for one piece, 2 x G rows (half of the sequence at G = seq/4),
instead of the whole sequence.

Each piece reads its rows of the layer input by index, adds its output
into the residual where those rows are (the scan's carry), and is
recomputed in the backward pass: the block's forward runs once more than
the layer's.
"""

import flax.linen as nn
import jax.numpy as jnp

from longlora_jax.attention.by_group import S2ByGroup
from longlora_jax.core.errors import LongLoraError
from longlora_jax.model.config import LlamaConfig
from longlora_jax.parallel.sharding import context_slices


def refusal(config: LlamaConfig, context: int = 1) -> str | None:
  """Why `config` (on `context` slices of the sequence) cannot run its
  attention by group, or None."""
  N, K = config.num_attention_heads, config.num_key_value_heads
  return next((why for bad, why in (
      (config.norm_placement != "pre",
       "it normalises the attention's output (norm_placement="
       f"{config.norm_placement!r}), which the pieces only sum"),
      (config.o_bias, "its o projection has a bias"),
      (any(config.local_layers), "it has sliding-window layers"),
      (config.attn_logit_softcapping, "it soft-caps attention scores"),
      (N % 2 or K % 2, f"its {N} query and {K} kv heads do not halve"),
      (context > 1, "the sequence is split over a context axis"),
  ) if bad), None)


def attention_by_group(block: nn.Module, config: LlamaConfig,
                       attend: S2ByGroup, x_BTD, positions_BT, segment_ids_BT,
                       layer):
  """The layer input `x_BTD` plus its attention, `[batch, seq, hidden]`.

  `block(x, positions, segment_ids, cache, layer, piece)` is the input norm
  and the attention of a layer of `config`, returning (`[b, G, hidden]`,
  cache); it runs over `attend`'s pieces in a rematerialised scan."""
  why = refusal(config, context_slices())
  if why:
    raise LongLoraError(f"S²-Attn by group cannot run this model: {why}")
  B, T, D = x_BTD.shape
  unshifted_gG, shifted_gG = attend.rows(T)
  g, G = unshifted_gG.shape

  def piece(block, sum_BTD, j, unshifted_G, shifted_G, x_BTD, positions_BT,
            segment_ids_BT):
    # Batch entry b's unshifted rows, then its shifted rows: [2B, G, ...].
    take = lambda a_BT: None if a_BT is None else jnp.stack(
        [a_BT[:, unshifted_G], a_BT[:, shifted_G]], axis=1).reshape(
            2 * B, G, *a_BT.shape[2:])
    y_bGD, _ = block(take(x_BTD), take(positions_BT), take(segment_ids_BT),
                     None, layer, (j, g))
    # Added into the running sum where the rows are: a carry, not stacked
    # outputs, so the pieces' results take one [batch, seq, hidden] buffer
    # and their gradients none of their own (the scan's rematerialisation
    # does not keep the sum, which no gradient reads).
    rows_2G = jnp.stack([unshifted_G, shifted_G])
    return sum_BTD.at[:, rows_2G].add(
        y_bGD.reshape(B, 2, G, D).astype(sum_BTD.dtype)), None

  scan = nn.scan(nn.remat(piece, prevent_cse=False),
                 variable_broadcast="params", split_rngs={"params": False},
                 in_axes=(0, 0, 0, nn.broadcast, nn.broadcast, nn.broadcast))
  sum_BTD, _ = scan(block, x_BTD, jnp.arange(g), unshifted_gG, shifted_gG,
                    x_BTD, positions_BT, segment_ids_BT)
  return sum_BTD
