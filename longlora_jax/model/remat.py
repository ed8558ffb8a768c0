"""What the decoder's layers keep for the backward pass: the remat policies.

"none" keeps every activation; "full" only each layer's input (the
[layers, batch, seq, hidden] stack) and recomputes the layer; "dots" also
keeps the projections' matmul outputs (no batch dims) and recomputes
attention and elementwise ops; "offload" is "full" with the layer inputs in
pinned host memory; "nested" is "full" per layer inside blocks of layers
rematerialised as one.
"""

import jax

# Each layer names its input (the residual stream it takes); "offload" is
# "full", except that this input, the one thing "full" keeps per layer,
# goes to pinned host memory in the forward pass and comes back for the
# backward pass (as MaxText offloads its "decoder_layer_input").
LAYER_INPUT = "decoder_layer_input"

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # The forward keeps only each block's input; the backward recomputes a
    # block's layer inputs when it reaches it (see `remat_blocks`).
    "nested": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device", offload_dst="pinned_host"),
}


def remat_blocks(layers: int, remat: str = "nested") -> int:
  """How many blocks `remat` cuts `layers` into: 1 but under "nested", the
  divisor b that keeps fewest layer inputs at once, b block inputs plus one
  block's layers / b (Chen et al. 2016's sqrt(n) checkpoints; 80 layers: 8
  blocks of 10, 18 inputs instead of 80), the fewer blocks on a tie. 1
  where no cut keeps fewer (3 layers, or any prime)."""
  if remat != "nested":
    return 1
  return min((b for b in range(1, layers + 1) if layers % b == 0),
             key=lambda b: (b + layers // b, b))


def kept_layer_inputs(layers: int, remat: str) -> int:
  """How many layer inputs the backward pass holds at once (the blocks'
  inputs and one block's layers' under "nested"; every layer's otherwise)."""
  blocks = remat_blocks(layers, remat)
  return layers if blocks == 1 else blocks + layers // blocks


def split_layers(layers_tree, layers: int, remat: str):
  """The stacked layer parameters as the decoder's scans take them: their
  layer axis split into [blocks, layers / blocks] under "nested" (a
  reshape of the unsharded leading axis), as they are otherwise."""
  blocks = remat_blocks(layers, remat)
  if blocks == 1:
    return layers_tree
  return jax.tree.map(lambda a: a.reshape(blocks, -1, *a.shape[1:]),
                      layers_tree)
