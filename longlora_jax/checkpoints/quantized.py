"""4-bit layer kernels placed on the devices as they are read, one layer at a
time: quantized from a checkpoint's plain weights (`quantize="nf4"`), or a
bitsandbytes checkpoint's own blocks (bnb.py), kept as they are.

Either way a layer's weight is an `NF4Tensor` in bitsandbytes' layout
(torch's [out, in], row-major blocks of 64) and its leaves are stacked over
the layers, each split by `sharding.param_spec` (the codes and block scales
over fsdp), so no device or host ever holds a bf16 model: the host holds
one layer of one tensor (in float32 while quantizing it), a device its
share of the 4-bit stack.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from longlora_jax.checkpoints.bnb import read_nf4
from longlora_jax.checkpoints.weights import Weights
from longlora_jax.core.errors import CheckpointError
from longlora_jax.model import nf4
from longlora_jax.parallel.sharding import param_spec

QUANTIZE = ("none", "nf4")


def check_quantize(quantize: str | None) -> str | None:
  """`quantize` as a read takes it (None for none), or a one-line error."""
  if quantize in (None, "none"):
    return None
  if quantize not in QUANTIZE:
    raise CheckpointError(f"unknown quantization {quantize!r}; choose one "
                          f"of {', '.join(QUANTIZE)}")
  return quantize


def leaf_shardings(path: tuple[str, ...], layer, sharding):
  """Shardings for the leaves of a stack of `layer`s (an NF4Tensor of one
  layer) at our parameter `path`, by the rules every train state follows
  (`param_spec`, which splits only the codes and block scales); on one
  device, that device."""
  if not isinstance(sharding, NamedSharding):
    return jax.tree.map(lambda _: sharding, layer)
  keys = tuple(jax.tree_util.DictKey(p) for p in path)
  return jax.tree_util.tree_map_with_path(
      lambda leaf_path, x: NamedSharding(sharding.mesh, param_spec(
          keys + leaf_path, (1, *np.shape(x)), sharding.mesh)), layer)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layers(stack, layer, index):
  """Every leaf's `stack[index] = layer[0]`, in place (donated)."""
  return jax.tree.map(
      lambda s, x: jax.lax.dynamic_update_slice_in_dim(s, x, index, 0),
      stack, layer)


def place_nf4(weights: Weights, path: tuple[str, ...], names: list[str],
              hf_shape: tuple[int, ...], sharding, dtype, stored: bool):
  """The layer kernel at our `path` as an NF4Tensor stacked over its layers
  (`names`, one HF tensor per layer, each [out, in] = `hf_shape`), each
  leaf in its shards: `stored` bitsandbytes blocks read as they are, else
  each layer's weight rounded to `dtype` (as the model would hold it) and
  quantized with double quantization, as bitsandbytes would."""
  def layer(name):
    if stored:
      t = read_nf4(weights, name)
      if t.shape != tuple(hf_shape):
        raise CheckpointError(f"{weights.files[name]}: 4-bit tensor {name} "
                              f"has shape {t.shape}, but config.json implies "
                              f"{tuple(hf_shape)}")
      return t
    # Rounded to `dtype`, then to float32 a chunk at a time by `quantize`.
    return nf4.quantize(np.asarray(weights.read(name)).astype(dtype,
                                                               copy=False))

  t = layer(names[0])
  structure = jax.tree.structure(t)
  shardings = leaf_shardings(path, t, sharding)
  stack = jax.tree.map(
      lambda x, s: jnp.zeros((len(names), *np.shape(x)), np.asarray(x).dtype,
                             device=s), t, shardings)
  for i, name in enumerate(names):
    if i:
      del t  # the host holds one layer's weight and blocks, not two
      t = layer(name)
    if jax.tree.structure(t) != structure:
      raise CheckpointError(f"{weights.files[name]}: {name} is quantized "
                            f"unlike {names[0]} (blocks or nesting differ); "
                            "quantize the checkpoint in one go")
    part = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(
            (1, *np.shape(x)), s,
            lambda index, x=x: np.asarray(x)[None][index]), t, shardings)
    stack = _set_layers(stack, part, i)
  return jax.block_until_ready(stack)
