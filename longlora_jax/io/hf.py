"""Hugging Face checkpoint import (`load_hf`) and export (`save_hf`).

Weights move tensor by tensor: loading fills one stacked parameter at a time
and hands it to JAX before reading the next, so host memory peaks near one
copy of the model; saving writes one shard at a time into a temporary
directory that is renamed into place only when complete.
"""

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
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from longlora_jax.config import LlamaConfig
from longlora_jax.errors import CheckpointError
from longlora_jax.io.files import atomic_dir, output_dir, write_json
from longlora_jax.io.hub import TOKENIZER_FILES, resolve_checkpoint
from longlora_jax.io.weights import open_weights
from longlora_jax.lora import LoRA
from longlora_jax.model import init_params

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

def _to_device(array: np.ndarray, sharding=None) -> jax.Array:
  # Waiting for the copy lets the host buffer go before the next one is
  # filled; async transfers would otherwise pile host copies up.
  return jax.device_put(array, sharding).block_until_ready()


def read_params(directory: Path, config: LlamaConfig, dtype=jnp.bfloat16,
                shardings=None):
  """The weights of the checkpoint in `directory` (whose config is
  `config`) as our parameter tree; open checkpoints with
  `io.checkpoint.Checkpoint`, which calls this.

  Args:
    dtype: parameter dtype (bfloat16, float16 or float32; or their names).
    shardings: a tree like the parameters of `jax.sharding.Sharding`s; each
      parameter goes to its sharding as soon as it is read (default: the
      default device).
  """
  dtype = as_dtype(dtype)
  files, read = open_weights(directory)
  expected = expected_shapes(config)
  placement = (traverse_util.flatten_dict(shardings) if shardings is not None
               else {})
  flat, used, buffers = {}, set(), {}
  tensors = list(hf_tensors(config, expected))
  for name, path, layer, hf_shape in tqdm(tensors, desc="load_hf",
                                          unit="tensor", disable=None,
                                          leave=False):
    if name not in files:
      raise CheckpointError(f"{directory}: tensor {name} is missing from the "
                            "weights")
    tensor = read(name)
    if tuple(tensor.shape) != hf_shape:
      raise CheckpointError(
          f"{files[name]}: tensor {name} has shape {tuple(tensor.shape)}, but "
          f"config.json implies {hf_shape}")
    if path[-1] == "kernel":
      tensor = tensor.T
    used.add(name)
    if layer is None:
      buffers[path] = tensor.astype(dtype)
    else:
      if path not in buffers:
        buffers[path] = np.empty(expected[path], dtype)
      buffers[path][layer] = tensor
    if layer is None or layer == config.num_hidden_layers - 1:
      flat[path] = _to_device(buffers.pop(path), placement.get(path))
  extra = sorted(n for n in set(files) - used if not _IGNORED_KEYS.search(n)
                 and not (config.tie_word_embeddings and n == "lm_head.weight"))
  if extra:
    raise CheckpointError(
        f"{directory}: weights hold tensors a plain Llama does not have "
        f"({', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''}); merge "
        "adapters before loading")
  return traverse_util.unflatten_dict(flat)


# ---- writing ----

def _parse_size(size: int | str) -> int:
  """Bytes from an int or "5GB"/"500MB" (decimal units, as transformers)."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
  if not m:
    raise CheckpointError(f"max_shard_size {size!r}: use bytes or e.g. '5GB'")
  return int(float(m[1]) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[m[2]])


def check_params(config: LlamaConfig, params) -> dict:
  flat = traverse_util.flatten_dict(params)
  expected = expected_shapes(config)
  for path in sorted(set(flat) | set(expected)):
    name = "/".join(path)
    if path not in flat:
      raise CheckpointError(f"params lack {name}, which the config needs")
    if path not in expected:
      raise CheckpointError(f"params hold {name}, which a Llama with this "
                            "config does not have (merge LoRA first)")
    if isinstance(flat[path], LoRA):
      raise CheckpointError(f"params {name} is a LoRA adapter; merge() it "
                            "first, or save the adapter with save_peft")
    if tuple(flat[path].shape) != tuple(expected[path]):
      raise CheckpointError(f"params {name} has shape {flat[path].shape}, "
                            f"but the config implies {expected[path]}")
  return flat


def save_hf(config: LlamaConfig, params, out_dir: str | os.PathLike,
            tokenizer_from: str | os.PathLike | None = None, *, dtype=None,
            max_shard_size: int | str = "5GB", overwrite: bool = False,
            generation_config: dict[str, Any] | None = None) -> Path:
  """Writes a HF checkpoint that `transformers` loads as LlamaForCausalLM.

  Writes `config.json` (with the RoPE scaling the model uses, in both the
  transformers 4 and 5 spellings), `model.safetensors` (or shards plus
  `model.safetensors.index.json` above `max_shard_size`),
  `generation_config.json`, and the tokenizer files of `tokenizer_from` (a
  directory or `hf:` id). The directory appears only once complete.

  Args:
    dtype: dtype of the saved weights; default the parameters' dtype.
    overwrite: replace a non-empty `out_dir` (atomically).
  """
  out = output_dir(out_dir, overwrite)
  flat = check_params(config, params)
  dtype = as_dtype(dtype) if dtype else np.dtype(
      flat[("embed_tokens", "embedding")].dtype)
  tokenizer_dir = None
  if tokenizer_from is not None:
    tokenizer_dir = resolve_checkpoint(tokenizer_from, patterns=TOKENIZER_FILES)
    if not any((tokenizer_dir / f).exists() for f in TOKENIZER_FILES):
      raise CheckpointError(f"{tokenizer_from}: no tokenizer files "
                            f"({', '.join(TOKENIZER_FILES)})")

  shapes = {path: x.shape for path, x in flat.items()}
  tensors = list(hf_tensors(config, shapes))
  shards, size, limit = [[]], 0, _parse_size(max_shard_size)
  for entry in tensors:
    nbytes = int(np.prod(entry[3])) * dtype.itemsize
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes

  with atomic_dir(out) as tmp:
    weight_map = {}
    for i, shard in enumerate(tqdm(shards, desc="save_hf", unit="shard",
                                   disable=None, leave=False)):
      file = ("model.safetensors" if len(shards) == 1 else
              f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
      arrays = {}
      for name, path, layer, _ in shard:
        value = flat[path] if layer is None else flat[path][layer]
        value = np.asarray(jax.device_get(value)).astype(dtype)
        arrays[name] = np.ascontiguousarray(
            value.T if path[-1] == "kernel" else value)
        weight_map[name] = file
      save_file(arrays, str(tmp / file), metadata={"format": "pt"})
      del arrays
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
    if tokenizer_dir is not None:
      for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).exists():
          shutil.copyfile(tokenizer_dir / f, tmp / f)
  return out
