"""LoRA as a transform of the parameter tree, and LongLoRA's trainable set.

`add_lora` swaps targeted projection kernels for `LoRA` nodes; the model's
`project` computes `x @ w + scale * (x @ a) @ b` for them, so `w + ba` never
exists during training. `trainable_mask` says what trains; `split` and
`combine` move between the full tree and the small trainable one, so the
optimizer is built over the trainable leaves only:

  params = lora.add_lora(params, key=key)
  trainable, frozen = lora.split(params, lora.trainable_mask(params))
  trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
  opt_state = optimizer.init(trainable)   # frozen leaves get no state
  loss = loss_fn(lora.combine(trainable, frozen), batch)   # grad wrt trainable

Frozen leaves keep their dtype (e.g. bfloat16); trainable leaves are float32
master copies. `merge` folds the adapters back into plain kernels.
"""

import math
import zlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from longlora_jax.core.errors import LongLoraError
from longlora_jax.model.nf4 import NF4Tensor, dequantize

# Official LongLoRA `--trainable_params embed,norm`: the embedding and every
# RMSNorm train alongside the adapters ("LoRA+").
LORA_PLUS = ("embed", "norm")
# (Phi-3 fuses q, k and v into qkv_proj; LoRA adapts it whole, as PEFT does.)
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")


@flax.struct.dataclass
class LoRA:
  """A frozen kernel with a low-rank update: `x @ w + scale * (x @ a) @ b`.

  w: [..., in, out]; a: [..., in, r]; b: [..., r, out]. The leading axes
  (the stacked layers) are shared. `w` is the first child because flax
  checks a parameter's shape against its first leaf; `scale` (alpha / r) is
  static, not a leaf, so it never trains.
  """
  w: Any
  a: Any
  b: Any
  scale: float = flax.struct.field(pytree_node=False)

  @property
  def rank(self) -> int:
    return self.a.shape[-1]


def is_lora(x) -> bool:
  return isinstance(x, LoRA)


def is_nf4_kernel(x) -> bool:
  """Whether `x` is a 4-bit kernel, bare or under a `LoRA` node."""
  return isinstance(x.w if is_lora(x) else x, NF4Tensor)


def kernel_shape(x) -> tuple[int, ...]:
  """The `[..., in, out]` shape of a kernel: an array, a `LoRA` node's base
  or a 4-bit one."""
  x = x.w if is_lora(x) else x
  return tuple(x.kernel_shape if isinstance(x, NF4Tensor) else x.shape)


def delta(x_BTD, node: LoRA, dtype):
  """`scale * (x @ a) @ b` in the compute dtype."""
  x_BTR = jnp.einsum("...D,DR->...R", x_BTD.astype(dtype),
                     node.a.astype(dtype))
  # Scaling the rank-r activations costs r, not out, multiplies per token.
  return jnp.einsum("...R,RF->...F", x_BTR * node.scale, node.b.astype(dtype))


def _kaiming_uniform_a(key, shape, dtype):
  """torch nn.Linear's default init (PEFT `init_lora_weights=True`) of a.

  kaiming_uniform_(a=sqrt(5)) on lora_A [r, in] is U(-1/sqrt(in), 1/sqrt(in)).
  """
  bound = 1.0 / math.sqrt(shape[-2])
  a = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
  return a.astype(dtype)


def add_lora(params, *, rank: int = 8, alpha: float = 16,
             targets: tuple[str, ...] | None = None, key: jax.Array,
             dtype=None):
  """`params` with each targeted layer kernel replaced by a `LoRA` node.

  `a` is Kaiming-uniform and `b` zero, as PEFT initialises them, so the model
  is unchanged until `b` trains. Scale is alpha / rank.

  Args:
    targets: projection names inside the layers (q_proj, ..., down_proj);
      default the attention projections the model has (`ATTENTION_TARGETS`).
    dtype: of `a` and `b`; default each kernel's own dtype.
  """
  if rank < 1:
    raise LongLoraError(f"LoRA rank must be >= 1, got {rank}")
  if any(is_lora(x) for x in jax.tree.leaves(params, is_leaf=is_lora)):
    raise LongLoraError("params already hold LoRA adapters; merge() them "
                        "first or start from the base params")
  layers = params["layers"]
  groups = {name: group for group, modules in layers.items()
            if isinstance(modules, dict)
            for name, m in modules.items()
            if isinstance(m, dict) and "kernel" in m}
  if targets is None:
    targets = tuple(t for t in ATTENTION_TARGETS if t in groups)
  unknown = [t for t in targets if t not in groups]
  if unknown or not targets:
    raise LongLoraError(f"unknown LoRA targets {unknown}; choose from "
                        f"{sorted(groups)}")
  new_layers = {group: dict(modules) for group, modules in layers.items()}
  for target in targets:
    module = layers[groups[target]][target]
    w_LDF = module["kernel"]
    *L, D, F = kernel_shape(w_LDF)
    # A 4-bit base's adapters take the dtype of the model's other weights.
    dt = dtype or getattr(w_LDF, "dtype",
                          params["embed_tokens"]["embedding"].dtype)
    # Keyed by name, so a target's init does not depend on the others.
    target_key = jax.random.fold_in(key, zlib.crc32(target.encode()))
    a_LDR = _kaiming_uniform_a(target_key, (*L, D, rank), dt)
    b_LRF = jnp.zeros((*L, rank, F), dt)
    new_layers[groups[target]][target] = {
        **module, "kernel": LoRA(w_LDF, a_LDR, b_LRF, alpha / rank)}
  return {**params, "layers": new_layers}


def _plain(w, dtype):
  """A kernel as an array of `dtype`: a 4-bit one dequantized and laid out
  `[..., in, out]`."""
  if not isinstance(w, NF4Tensor):
    return w.astype(dtype)
  return jnp.swapaxes(dequantize(w, dtype), -1, -2)


def merge(params, nf4_dtype=jnp.bfloat16):
  """Plain params: every `LoRA` node becomes `w + scale * a @ b`, every
  4-bit kernel an array of `nf4_dtype`.

  Computed in float32 at full matmul precision (this runs once, for export),
  then cast to `w`'s dtype (`nf4_dtype` for a 4-bit `w`, dequantized
  first).
  """
  is_node = lambda x: is_lora(x) or isinstance(x, NF4Tensor)

  def fold(x):
    if not is_lora(x):
      return _plain(x, nf4_dtype) if isinstance(x, NF4Tensor) else x
    ab_LDF = jnp.einsum("...DR,...RF->...DF", x.a.astype(jnp.float32),
                        x.b.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    dtype = nf4_dtype if isinstance(x.w, NF4Tensor) else x.w.dtype
    return (_plain(x.w, jnp.float32) + x.scale * ab_LDF).astype(dtype)
  return jax.tree.map(fold, params, is_leaf=is_node)


def strip(params):
  """Plain params without the adapters (each `LoRA` node's base `w`)."""
  return jax.tree.map(lambda x: x.w if is_lora(x) else x, params,
                      is_leaf=is_lora)


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def trainable_mask(params, extra: tuple[str, ...] = LORA_PLUS):
  """Bool tree, True where a leaf trains: LoRA `a`, `b`, plus `extra`.

  `extra` names, as substrings of the parameter path, the other leaves that
  train, like the official `--trainable_params`:

    LORA_PLUS = ("embed", "norm")  LongLoRA: embed_tokens and every RMSNorm
    ()                             plain LoRA: the adapters only
    ("embed", "norm", "lm_head")   also the (untied) output head

  A base kernel under a `LoRA` node never trains. For full fine-tuning use
  `full_mask`.
  """
  if isinstance(extra, str):
    raise LongLoraError(f"extra must be a tuple of names, got {extra!r}")
  used = set()

  def leaf(path, x):
    if is_lora(x):
      return x.replace(w=jax.tree.map(lambda _: False, x.w), a=True, b=True)
    name = _path_name(path)
    hits = {e for e in extra if e in name}
    used.update(hits)
    return bool(hits)

  mask = jax.tree_util.tree_map_with_path(leaf, params, is_leaf=is_lora)
  unmatched = sorted(set(extra) - used)
  if unmatched:
    raise LongLoraError(f"trainable params {unmatched} match no parameter; "
                        "names are substrings of e.g. embed_tokens/embedding, "
                        "layers/input_layernorm/weight, norm/weight, "
                        "lm_head/kernel")
  if not any(jax.tree.leaves(mask)):
    raise LongLoraError("nothing would train: add_lora() first, pass extra "
                        "names, or use full_mask() for full fine-tuning")
  return mask


def full_mask(params):
  """Bool tree, every leaf True: full fine-tuning."""
  return jax.tree.map(lambda _: True, params)


def split(params, mask):
  """(trainable, frozen): `params` twice, with None where the other keeps a
  leaf. Optimizer state built over `trainable` exists only for its leaves.

  `mask` is a tree of Python bools (`trainable_mask`, `full_mask`).
  """
  trainable = jax.tree.map(lambda x, m: x if m else None, params, mask)
  frozen = jax.tree.map(lambda x, m: None if m else x, params, mask)
  return trainable, frozen


def combine(trainable, frozen):
  """The full tree again: each leaf from whichever of the two holds it."""
  return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                      is_leaf=lambda x: x is None)


def count_params(tree) -> int:
  """Number of scalars in a tree of arrays or `jax.ShapeDtypeStruct`s."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
