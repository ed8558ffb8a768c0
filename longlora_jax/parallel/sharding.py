"""Device mesh and parameter sharding rules (FSDP, context and tensor
parallel).

The mesh has four named axes: `data` (pure data parallel), `fsdp` (data
parallel with parameters and optimizer state sharded), `context` (each
device holds a contiguous slice of every row's tokens; parameters and
optimizer state are sharded over fsdp x context, as MaxText does) and
`tensor` (projections split Megatron-style). The batch is split over
data x fsdp, the sequence over context.
"""

import contextlib
import contextvars
import functools
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from longlora_jax.core.errors import LongLoraError

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")
SEQ_AXIS = "context"
# Parameters are split over every axis that does not split them otherwise:
# context devices hold different tokens of the same rows, so like fsdp
# devices they can each keep a part of the weights and gather it per layer.
FSDP_AXES = ("fsdp", SEQ_AXIS)
# Megatron split: column-parallel projections split their output features,
# row-parallel ones their input features, so each pair needs one all-reduce.
_COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",
                    "qkv_proj", "gate_up_proj", "lm_head")
_ROW_PARALLEL = ("o_proj", "down_proj")
# The leaves of a 4-bit weight (model/nf4.py's NF4Tensor): the codes and
# their block scales are flat and split over fsdp; the rest is small.
_NF4_SPLIT = ("packed", "absmax")
_NF4_WHOLE = ("nested_absmax", "nested_code", "offset")


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
  """Axis sizes from e.g. "fsdp=8", "data=2,fsdp=-1" (-1: the rest)."""
  sizes = dict.fromkeys(MESH_AXES, 1)
  fill = None
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, _, value = part.partition("=")
    name = name.strip()
    if name not in MESH_AXES:
      raise LongLoraError(f"mesh {spec!r}: unknown axis {name!r}; use "
                          f"{', '.join(MESH_AXES)} (e.g. fsdp={num_devices})")
    try:
      size = int(value)
    except ValueError:
      raise LongLoraError(f"mesh {spec!r}: {part!r} needs an integer size, "
                          "e.g. fsdp=8 or fsdp=-1") from None
    if size == -1:
      if fill is not None:
        raise LongLoraError(f"mesh {spec!r}: only one axis may be -1")
      fill = name
    elif size < 1:
      raise LongLoraError(f"mesh {spec!r}: axis sizes must be >= 1 or -1")
    else:
      sizes[name] = size
  known = math.prod(sizes.values())
  if fill is not None:
    if num_devices % known:
      raise LongLoraError(
          f"mesh {spec!r}: the fixed axes use {known} devices, which does not "
          f"divide the {num_devices} available")
    sizes[fill] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    # Only meshes that fit the devices here are suggested.
    hint = f"fsdp={num_devices}" + (" or data=2,fsdp=-1" if num_devices % 2 == 0
                                     else "")
    raise LongLoraError(
        f"mesh {spec!r} has {math.prod(sizes.values())} devices but "
        f"{num_devices} are available; e.g. use {hint}")
  return sizes


def make_mesh(spec: str = "fsdp=-1", devices=None) -> Mesh:
  """A mesh over all (global) devices, or `devices`, from a spec string."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = parse_mesh(spec, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def _names(path) -> tuple[str, ...]:
  """The dict keys and attribute names along a pytree key path."""
  names = []
  for key in path:
    for attr in ("key", "name"):
      if isinstance(getattr(key, attr, None), str):
        names.append(getattr(key, attr))
  return tuple(names)


def param_spec(path, shape: tuple[int, ...], mesh: Mesh,
               fsdp_axes: tuple[str, ...] = FSDP_AXES) -> P:
  """PartitionSpec of one parameter (or optimizer-state leaf) by its path.

  Tensor parallel first (by module name), then FSDP: the largest remaining
  dimension divisible by fsdp x context (the axes of `FSDP_AXES` larger
  than 1). The stacked layer axis is never
  split, so `nn.scan` slices stay local. Leaves that nothing divides are
  replicated.
  """
  names = _names(path)
  spec = [None] * len(shape)
  axes = tuple(a for a in fsdp_axes if mesh.shape[a] > 1)
  ways = math.prod(mesh.shape[a] for a in axes)
  if names[-1:] and names[-1] in _NF4_SPLIT + _NF4_WHOLE:
    # A 4-bit weight: its flat last axis over fsdp where it divides (never
    # the layer axis, nor over tensor: a block's codes stay together).
    if names[-1] in _NF4_SPLIT and ways > 1 and shape[-1] % ways == 0:
      spec[-1] = axes[0] if len(axes) == 1 else axes
    return P(*spec)
  first = 1 if "layers" in names and len(shape) > 1 else 0
  free = list(range(first, len(shape)))
  tensor = mesh.shape["tensor"]
  if tensor > 1 and len(free) >= 2:
    module = next((n for n in names if n in _COLUMN_PARALLEL + _ROW_PARALLEL),
                  None)
    # LoRA factors: the column-parallel split lands on B's outputs, the
    # row-parallel one on A's inputs; the rank axis stays whole.
    is_a, is_b = "a" in names[-1:], "b" in names[-1:]
    axis = None
    if module in _COLUMN_PARALLEL and not is_a:
      axis = free[-1]
    elif module in _ROW_PARALLEL and not is_b:
      axis = free[0]
    if axis is not None and shape[axis] % tensor == 0:
      spec[axis] = "tensor"
      free.remove(axis)
  if ways > 1:
    divisible = [d for d in free if shape[d] % ways == 0]
    if divisible:
      # A layer kernel splits the first axis it can after the layer axis
      # (the major one of a layer's slice): the scan's all-gather then joins
      # contiguous parts. Split on its minor (out) axis, XLA:GPU lays the
      # whole stack out with that axis major for the backward's gather: a
      # transposed copy of all layers' gate/up weights on every device
      # (2 x 4.38 GiB for Llama-2-70B on fsdp=8).
      kernel = "layers" in names and names[-1:] in (("kernel",), ("w",))
      spec[divisible[0] if kernel else max(divisible,
                                           key=lambda d: shape[d])] = (
          axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def shardings_like(tree, mesh: Mesh):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, param_spec(path, np.shape(x), mesh)),
      tree)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) axis over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_parallelism(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def context_parallelism(mesh: Mesh) -> int:
  """Devices a row's tokens are split over."""
  return mesh.shape[SEQ_AXIS]


# The mesh the model's activations are laid out on while a step is traced;
# None outside `activation_mesh` (single device, tests, inference).
_ACTIVATION_MESH = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh):
  """While tracing inside this block, `shard_batch` pins activations to
  `mesh`'s batch axes."""
  token = _ACTIVATION_MESH.set(mesh)
  try:
    yield
  finally:
    _ACTIVATION_MESH.reset(token)


def context_slices() -> int:
  """Slices a row's tokens are split into under `activation_mesh` (1
  outside it): code that scans over the sequence scans each slice's part."""
  mesh = _ACTIVATION_MESH.get()
  return 1 if mesh is None else context_parallelism(mesh)


def gather_over_context(layer_params):
  """One layer's weights, all-gathered over the context axis (still split
  over fsdp and tensor) under `activation_mesh`.

  Said explicitly, as FSDP does per layer: left to GSPMD, XLA:GPU kept a
  hidden-major copy of the whole residual stack for the backward pass when
  the weights and the tokens were split over the same axis.
  """
  mesh = _ACTIVATION_MESH.get()
  if mesh is None or context_parallelism(mesh) == 1:
    return layer_params
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jax.lax.with_sharding_constraint(x, NamedSharding(
          mesh, param_spec(path, np.shape(x), mesh, ("fsdp",)))),
      layer_params)


def activation_spec(ndim: int) -> P:
  """`[batch, seq, ...]` arrays: rows over data x fsdp, tokens over context."""
  return P(BATCH_AXES, *([SEQ_AXIS] if ndim > 1 else []),
           *([None] * (ndim - 2)))


def shard_batch(x):
  """Pins `[batch, seq, ...]` activations to data x fsdp and context (FSDP
  semantics).

  Without it, GSPMD may follow the weights' fsdp split into the activations
  and all-reduce whole [batch, seq, hidden] tensors on every device instead
  of all-gathering each layer's weights.
  """
  mesh = _ACTIVATION_MESH.get()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, activation_spec(x.ndim)))


def per_row_shard(attention_fn, context_fn=None):
  """`attention_fn` run on each device's own rows under `activation_mesh`.

  Attention never mixes rows, but a fused kernel (a Pallas/Triton custom
  call) has no partitioning rule, so GSPMD would replicate it: all-gather
  q, k and v over the batch axes and compute every row on every device.
  Heads stay whole (S²-Attn shifts half of all heads, not of a shard's).

  On a mesh with a context axis each device holds a slice of every row's
  tokens, and `context_fn` (the context-parallel form of the same
  attention, `attention.context`) runs instead, with `axis_name` and
  `axis_size` naming that axis; without one that is a user error.
  """
  def attend(q_BTNH, k_BTKH, v_BTKH, *, segment_ids_BT=None):
    mesh = _ACTIVATION_MESH.get()
    context = 1 if mesh is None else context_parallelism(mesh)
    if mesh is None or batch_parallelism(mesh) * context == 1:
      return attention_fn(q_BTNH, k_BTKH, v_BTKH,
                          segment_ids_BT=segment_ids_BT)
    fn = attention_fn
    if context > 1:
      if context_fn is None:
        raise LongLoraError(
            f"attention {attention_fn!r} has no context-parallel form; pass "
            "one the library makes (a name, an AttentionSpec, or functools."
            "partial of s2_attention or full_attention with its options, "
            "not a function around one), or use a mesh without a context "
            "axis")
      fn = functools.partial(context_fn, axis_name=SEQ_AXIS,
                             axis_size=context)
    rows = activation_spec(2)
    local = lambda q, k, v, *seg: fn(
        q, k, v, segment_ids_BT=seg[0] if seg else None)
    args = (q_BTNH, k_BTKH, v_BTKH) + (
        () if segment_ids_BT is None else (segment_ids_BT,))
    return jax.shard_map(local, mesh=mesh, in_specs=(rows,) * len(args),
                         out_specs=rows, check_vma=False)(*args)
  return attend
