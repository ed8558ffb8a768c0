"""Hugging Face checkpoint import (`load_hf`) and export (`save_hf`).

Weights move in parts, never a model at a time. Loading reads each device's
part of one layer of one tensor (safetensors slices) straight into its
place in the parameter's shards, so a process holds one layer of one tensor
beyond the device buffers (`loading_memory`). Saving gathers one tensor (one
layer) at a time to the writing process and writes one output shard file at
a time into a temporary directory, renamed into place only when complete.
"""

import contextlib
import functools
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from longlora_jax.model.config import LlamaConfig
from longlora_jax.core.errors import CheckpointError
from longlora_jax.core.files import atomic_dir, output_dir, write_json
from longlora_jax.checkpoints.bnb import quantized_names
from longlora_jax.checkpoints.hub import TOKENIZER_FILES, resolve_checkpoint
from longlora_jax.checkpoints.quantized import (check_quantize,
                                               leaf_shardings, place_nf4)
from longlora_jax.checkpoints.tokenizer import (load_tokenizer,
                                              rebuilt_for_export,
                                              save_tokenizer)
from longlora_jax.checkpoints.weights import open_weights, write_safetensors
from longlora_jax.model.lora import LoRA, kernel_shape, merge
from longlora_jax.model import nf4
from longlora_jax.model.nf4 import NF4Tensor
from longlora_jax.model.llama import init_params

# Buffers some old checkpoints saved; recomputed from the config, not loaded.
_IGNORED_KEYS = re.compile(r"rotary_emb\.inv_freq$")
_DTYPE_NAMES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16,
                "float32": jnp.float32}


# ---- names ----

def hf_name(path: tuple[str, ...], layer: int | None = None) -> str:
  """HF state-dict key of our parameter `path` (for stacked layers, one layer).

  ('layers', 'self_attn', 'q_proj', 'kernel'), 3 -> model.layers.3.self_attn.q_proj.weight
  """
  modules = list(path[:-1])
  if modules[0] == "layers":
    modules.insert(1, str(layer))
  leaf = "bias" if path[-1] == "bias" else "weight"
  name = ".".join(modules) + "." + leaf
  return name if modules[0] == "lm_head" else "model." + name


def hf_tensors(config: LlamaConfig, flat_shapes: dict) -> Iterator[tuple]:
  """(hf key, our path, layer or None, HF shape) in HF order."""
  for path, shape in flat_shapes.items():
    per_layer = tuple(shape[1:]) if path[0] == "layers" else tuple(shape)
    hf_shape = per_layer[::-1] if path[-1] == "kernel" else per_layer
    layers = range(config.num_hidden_layers) if path[0] == "layers" else [None]
    for i in layers:
      yield hf_name(path, i), path, i, hf_shape


@functools.cache
def expected_shapes(config: LlamaConfig) -> dict:
  abstract = jax.eval_shape(functools.partial(init_params, config),
                            jax.random.key(0))
  return {p: x.shape for p, x in traverse_util.flatten_dict(abstract).items()}


def as_dtype(dtype) -> np.dtype:
  """A numpy dtype from a jnp dtype or a name such as "bfloat16"."""
  if isinstance(dtype, str):
    if dtype not in _DTYPE_NAMES:
      raise CheckpointError(f"unknown dtype {dtype!r}; choose one of "
                            f"{sorted(_DTYPE_NAMES)}")
    dtype = _DTYPE_NAMES[dtype]
  return np.dtype(dtype)


# ---- reading ----

@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack_LXY, layer_1XY, layer):
  """`stack[layer] = layer_1XY[0]`, in place (the stack is donated)."""
  return jax.lax.dynamic_update_slice_in_dim(stack_LXY, layer_1XY, layer, 0)


def _place(shape, sharding, read, dtype, stacked: bool) -> jax.Array:
  """A parameter of `shape` in `sharding`, each device's part read directly:
  `read(layer or None, index)` gives the array at `index` (a tuple of
  slices over the parameter's per-layer axes). A stacked layer parameter is
  filled one layer at a time into its place on the devices, so the host
  holds at most one layer's part for one device."""
  if stacked:
    layer_shape = (1, *shape[1:])
    out = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
    for layer in range(shape[0]):
      part = jax.make_array_from_callback(
          layer_shape, sharding,
          lambda index, layer=layer: read(layer, index[1:])[None])
      out = _set_layer(out, part, layer)
    return out.block_until_ready()
  return jax.make_array_from_callback(
      shape, sharding, lambda index: read(None, index)).block_until_ready()


def loading_memory(config: LlamaConfig, shardings, dtype=jnp.bfloat16,
                   process_devices: int | None = None,
                   quantize: str | None = None) -> dict:
  """Bytes `read_params` holds at its peak, from the shapes and shardings
  alone (no checkpoint needed; compile-only devices will do).

  device_final: the most any device holds once loading is done (its
  shards); device_transient: what a device holds above that at most, the
  one-layer part being placed and the previous one still pending;
  host_transient: what a process holds at most, the parts of one layer of
  one tensor (or of one unstacked tensor) for its `process_devices`
  devices (default: every device of the sharding), as read from the files.

  quantize="nf4": the layer kernels as `place_nf4` quantizes them as they
  are read: on the devices their 4-bit blocks in the leaves' shardings; on
  the host one layer's whole weight (a process quantizes all of it,
  whatever its devices hold; files in `dtype`) and `nf4.quantize`'s work.
  """
  quantize = check_quantize(quantize)
  itemsize = as_dtype(dtype).itemsize
  placement = traverse_util.flatten_dict(shardings)
  final, transient, host = {}, 0, 0
  for path, shape in expected_shapes(config).items():
    stacked = path[0] == "layers"
    quantized = bool(quantize) and stacked and path[-1] == "kernel"
    if quantized:
      n = int(np.prod(shape[1:]))
      layer = nf4.abstract(shape[1:])
      leaves = zip(jax.tree.leaves(layer), jax.tree.leaves(
          leaf_shardings(path, layer, placement[path])))
      parts = [(s, (shape[0], *x.shape), x.dtype.itemsize) for x, s in leaves]
      host = max(host, n * itemsize + nf4.quantize_host_bytes(n))
    else:  # read in parts, each device's own
      parts = [(placement[path], tuple(shape), itemsize)]
    layer_part = 0
    for sharding, full, size in parts:
      part = sharding.shard_shape(full)
      for device in sharding.device_set:
        final[device] = final.get(device, 0) + int(np.prod(part)) * size
      layer_part += int(np.prod(part[1:] if stacked else part)) * size
    if stacked:
      transient = max(transient, 2 * layer_part)
    if not quantized:
      devices = process_devices or len(placement[path].device_set)
      host = max(host, devices * layer_part)
  return {"device_final": max(final.values()),
          "device_transient": transient, "host_transient": host}


def read_params(directory: Path, config: LlamaConfig, dtype=jnp.bfloat16,
                shardings=None, quantize: str | None = None):
  """The weights of the checkpoint in `directory` (whose config is
  `config`) as our parameter tree; open checkpoints with
  `io.checkpoint.Checkpoint`, which calls this.

  Args:
    dtype: parameter dtype (bfloat16, float16 or float32; or their names).
    shardings: a tree like the parameters of `jax.sharding.Sharding`s
      (default: every parameter on the default device). Each device reads
      only its own part of each tensor (safetensors slices; one layer at a
      time), so no process holds a whole stacked tensor, let alone the
      model, and a process reads only what its devices hold.
    quantize: "nf4" quantizes the layer kernels as they are read
      (`quantized.place_nf4`). A bitsandbytes 4-bit checkpoint's kernels
      are read as the 4-bit blocks they are, whatever this says.
  """
  dtype = as_dtype(dtype)
  quantize = check_quantize(quantize)
  weights = open_weights(directory)
  stored = set(quantized_names(weights))  # bitsandbytes 4-bit weights
  expected = expected_shapes(config)
  placement = (traverse_util.flatten_dict(shardings) if shardings is not None
               else {})
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  names = {}  # path -> [hf name per layer, or one]
  for name, path, layer, hf_shape in hf_tensors(config, expected):
    if name not in weights.files:
      raise CheckpointError(f"{directory}: tensor {name} is missing from the "
                            "weights")
    if name in stored and not (path[0] == "layers" and path[-1] == "kernel"):
      raise CheckpointError(f"{weights.files[name]}: {name} is 4-bit; only "
                            "the layers' projections are read in 4 bits; "
                            "quantize the checkpoint with its other weights "
                            "unquantized (transformers' default)")
    if name not in stored and tuple(weights.shape(name)) != hf_shape:
      raise CheckpointError(
          f"{weights.files[name]}: tensor {name} has shape "
          f"{tuple(weights.shape(name))}, but config.json implies {hf_shape}")
    names.setdefault(path, []).append(name)
  used = {n for layer_names in names.values() for n in layer_names}
  extra = sorted(n for n in set(weights.files) - used
                 if not _IGNORED_KEYS.search(n) and not (
                     config.tie_word_embeddings and n == "lm_head.weight")
                 and n.rsplit(".weight.", 1)[0] + ".weight" not in stored)
  if extra:
    raise CheckpointError(
        f"{directory}: weights hold tensors a plain Llama does not have "
        f"({', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''}); merge "
        "adapters before loading")
  flat = {}
  for path in tqdm(names, desc="load_hf", unit="tensor", disable=None,
                   leave=False):
    kernel = path[-1] == "kernel"
    four_bit = names[path][0] in stored
    if kernel and path[0] == "layers" and (quantize or four_bit):
      flat[path] = place_nf4(weights, path, names[path],
                             expected[path][:0:-1],
                             placement.get(path, default), dtype, four_bit)
      continue

    def read(layer, index, path=path, kernel=kernel):
      # Our kernels are [in, out], HF's [out, in]: slice theirs, transpose.
      name = names[path][0 if layer is None else layer]
      part = weights.read(name, tuple(index)[::-1] if kernel else
                          tuple(index))
      return np.asarray(part.T if kernel else part).astype(dtype, copy=False)
    flat[path] = _place(expected[path], placement.get(path, default), read,
                        dtype, stacked=path[0] == "layers")
  return traverse_util.unflatten_dict(flat)


# ---- writing ----

def parse_size(size: int | str) -> int:
  """Bytes from an int or "5GB"/"500MB" (decimal units, as transformers)."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
  if not m:
    raise CheckpointError(f"max_shard_size {size!r}: use bytes or e.g. '5GB'")
  return int(float(m[1]) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[m[2]])


def check_params(config: LlamaConfig, params, lora_ok: bool = False) -> dict:
  """`params` flattened, checked against the shapes `config` implies; LoRA
  nodes refused unless `lora_ok`."""
  flat = traverse_util.flatten_dict(params)
  expected = expected_shapes(config)
  for path in sorted(set(flat) | set(expected)):
    name = "/".join(path)
    if path not in flat:
      raise CheckpointError(f"params lack {name}, which the config needs")
    if path not in expected:
      raise CheckpointError(f"params hold {name}, which a Llama with this "
                            "config does not have (merge LoRA first)")
    if isinstance(flat[path], LoRA) and not lora_ok:
      raise CheckpointError(f"params {name} is a LoRA adapter; save it with "
                            "merge_lora=True, or the adapter with save_peft")
    shape = kernel_shape(flat[path])
    if tuple(shape) != tuple(expected[path]):
      raise CheckpointError(f"params {name} has shape {shape}, but the "
                            f"config implies {expected[path]}")
  return flat


def to_host(value, dtype=None, transpose: bool = False) -> np.ndarray:
  """An array, however sharded, whole on this host (in `dtype`; its axes
  reversed if `transpose`), built from its shards one at a time: no device
  holds it whole, and the host one copy (`np.asarray` would keep a second
  one cached on the array). In a multi-process run it is a collective:
  every process calls it for the same arrays."""
  dtype = np.dtype(dtype or value.dtype)
  flip = (lambda x: x.T) if transpose else (lambda x: x)
  if not getattr(value, "is_fully_addressable", True):
    from jax.experimental import multihost_utils
    whole = multihost_utils.process_allgather(value, tiled=True)
    return np.ascontiguousarray(flip(np.asarray(whole)), dtype)
  if not isinstance(value, jax.Array):
    return np.ascontiguousarray(flip(np.asarray(value)), dtype)
  out = np.empty(value.shape[::-1] if transpose else value.shape, dtype)
  for shard in value.addressable_shards:  # replicas write the same values
    index = shard.index[::-1] if transpose else shard.index
    out[index] = flip(np.asarray(shard.data))
  return out


def _slice(value, layer):
  """One layer of a stacked parameter (all of it for `layer` None); a LoRA
  node's layer merged into a plain kernel (a 4-bit one dequantized, in
  float32), on the devices that hold it."""
  if layer is not None:
    value = jax.tree.map(lambda x: x[layer], value)
  return (merge(value, jnp.float32) if isinstance(value, (LoRA, NF4Tensor))
          else value)


def save_hf(config: LlamaConfig, params, out_dir: str | os.PathLike,
            tokenizer_from: str | os.PathLike | None = None, *, dtype=None,
            max_shard_size: int | str = "5GB", overwrite: bool = False,
            merge_lora: bool = False,
            generation_config: dict[str, Any] | None = None,
            card: str | None = None) -> Path:
  """Writes a HF checkpoint that `transformers` loads (the config's family).

  Writes `config.json` (with the RoPE scaling the model uses, in both the
  transformers 4 and 5 spellings), `model.safetensors` (or shards plus
  `model.safetensors.index.json` above `max_shard_size`),
  `generation_config.json`, and the tokenizer files of `tokenizer_from` (a
  directory or `hf:` id): copied, or, where it has tokenizer.model and no
  tokenizer.json (Meta's releases), written from its loaded tokenizer
  (`tokenizer.save_tokenizer`) so that transformers loads the same
  tokenizer from the export alone. The directory appears only once
  complete.

  The parameters may be sharded over devices and processes: one tensor
  (one layer of a stacked one) at a time comes to the host and goes into
  its file, so the host holds one tensor, never a shard file, let alone
  the model. In a multi-process run every process calls this and process 0
  writes.

  Args:
    dtype: dtype of the saved weights; default the parameters' dtype.
    overwrite: replace a non-empty `out_dir` (atomically).
    merge_lora: write LoRA nodes merged (w + scale * a @ b), a layer at a
      time, instead of refusing them.
    card: the model card, written as README.md (the Hub's place for it).
  """
  out = output_dir(out_dir, overwrite)
  flat = check_params(config, params, lora_ok=merge_lora)
  dtype = as_dtype(dtype) if dtype else np.dtype(
      flat[("embed_tokens", "embedding")].dtype)
  writing = jax.process_index() == 0
  tokenizer_dir = tokenizer = None
  if tokenizer_from is not None:
    tokenizer_dir = resolve_checkpoint(tokenizer_from, patterns=TOKENIZER_FILES)
    if not any((tokenizer_dir / f).exists() for f in TOKENIZER_FILES):
      raise CheckpointError(f"{tokenizer_from}: no tokenizer files "
                            f"({', '.join(TOKENIZER_FILES)})")
    if rebuilt_for_export(tokenizer_dir):
      tokenizer = load_tokenizer(tokenizer_dir)

  tensors = list(hf_tensors(config, expected_shapes(config)))
  shards, size, limit = [[]], 0, parse_size(max_shard_size)
  for entry in tensors:
    nbytes = int(np.prod(entry[3])) * dtype.itemsize
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes

  with atomic_dir(out) if writing else contextlib.nullcontext() as tmp:
    weight_map = {}
    for i, shard in enumerate(tqdm(shards, desc="save_hf", unit="shard",
                                   disable=None if writing else True,
                                   leave=False)):
      file = ("model.safetensors" if len(shards) == 1 else
              f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
      # Gathered one at a time, as the file takes them.
      values = (to_host(_slice(flat[path], layer), dtype,
                        transpose=path[-1] == "kernel")
                for _, path, layer, _ in shard)
      if writing:
        write_safetensors(tmp / file, [(name, shape, dtype)
                                       for name, _, _, shape in shard],
                          values, metadata={"format": "pt"})
      else:
        for _ in values:  # the other processes' part of each gather
          pass
      weight_map.update({name: file for name, *_ in shard})
    if not writing:
      return out
    if len(shards) > 1:
      total = sum(int(np.prod(t[3])) * dtype.itemsize for t in tensors)
      write_json(tmp / "model.safetensors.index.json",
                 {"metadata": {"total_size": total}, "weight_map": weight_map})
    config.save(tmp, torch_dtype=dtype.name, dtype=dtype.name)
    gen = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id",
                                           "pad_token_id")
           if getattr(config, k) is not None}
    write_json(tmp / "generation_config.json",
               {**gen, **(generation_config or {})})
    if card is not None:
      (tmp / "README.md").write_text(card)
    if tokenizer is not None:
      save_tokenizer(tokenizer, tmp, tokenizer_dir)
    elif tokenizer_dir is not None:
      for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).exists():
          shutil.copyfile(tokenizer_dir / f, tmp / f)
  return out
