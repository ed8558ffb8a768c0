"""Hugging Face checkpoint import (`load_hf`) and export (`save_hf`).

Weights move tensor by tensor: loading fills one stacked parameter at a time
and hands it to JAX before reading the next, so host memory peaks near one
copy of the model; saving writes one shard at a time into a temporary
directory that is renamed into place only when complete.
"""

import contextlib
import functools
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from longlora_jax.config import LlamaConfig
from longlora_jax.errors import CheckpointError
from longlora_jax.lora import LoRA
from longlora_jax.model import init_params

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja")
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
  name = ".".join(modules) + ".weight"
  return name if modules[0] == "lm_head" else "model." + name


def _hf_tensors(config: LlamaConfig, flat_shapes: dict) -> Iterator[tuple]:
  """(hf key, our path, layer or None, HF shape) in HF order."""
  for path, shape in flat_shapes.items():
    per_layer = tuple(shape[1:]) if path[0] == "layers" else tuple(shape)
    hf_shape = per_layer[::-1] if path[-1] == "kernel" else per_layer
    layers = range(config.num_hidden_layers) if path[0] == "layers" else [None]
    for i in layers:
      yield hf_name(path, i), path, i, hf_shape


def _expected_shapes(config: LlamaConfig) -> dict:
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


# ---- resolving a checkpoint ----

def resolve_checkpoint(spec: str | os.PathLike,
                       patterns: tuple[str, ...] = ("*.json", "*.safetensors",
                                                    *TOKENIZER_FILES)) -> Path:
  """A local directory for `spec`: a path, or `hf:ORG/NAME[@revision]`.

  Hub ids go through huggingface_hub's cache (honours HF_HOME and
  HF_HUB_OFFLINE). Safetensors are fetched; `.bin` weights only when the repo
  has no safetensors.
  """
  spec = str(spec)
  if not spec.startswith("hf:"):
    path = Path(spec).expanduser()
    if not path.is_dir():
      raise CheckpointError(
          f"{spec}: no such directory; pass a local Hugging Face checkpoint "
          "directory or hf:ORG/NAME")
    return path
  repo, _, revision = spec[3:].partition("@")
  path = _snapshot(repo, revision or None, patterns)
  if "*.safetensors" in patterns and not any(path.glob("*.safetensors")):
    path = _snapshot(repo, revision or None, (*patterns, "*.bin"))
  return path


def _snapshot(repo: str, revision: str | None, patterns) -> Path:
  from huggingface_hub import constants, errors, snapshot_download
  fetch = (f"fetch it where the Hub is reachable with `hf download {repo}` "
           "(gated repos such as meta-llama need `hf auth login` first) and "
           "copy the cache, or pass a local checkpoint directory")
  try:
    return Path(snapshot_download(repo, revision=revision,
                                  allow_patterns=list(patterns)))
  except errors.GatedRepoError:
    raise CheckpointError(f"hf:{repo} is gated: accept its license on "
                          "huggingface.co, run `hf auth login`, then retry") from None
  except errors.RepositoryNotFoundError:
    raise CheckpointError(f"hf:{repo}: no such repository on the Hugging Face "
                          "Hub (private repos need `hf auth login`)") from None
  except errors.RevisionNotFoundError:
    raise CheckpointError(f"hf:{repo}: no revision {revision!r}") from None
  except (errors.LocalEntryNotFoundError, OSError):
    where = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
             else "the Hub cannot be reached")
    raise CheckpointError(
        f"hf:{repo} is not in the local Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and {where}: {fetch}") from None


# ---- reading weights ----

def _read_index(file: Path) -> dict[str, Path]:
  try:
    with open(file) as f:
      weight_map = json.load(f)["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise CheckpointError(f"{file}: not a valid weight index ({e!r})") from None
  files = {name: file.parent / shard for name, shard in weight_map.items()}
  for shard in sorted(set(files.values())):
    if not shard.exists():
      raise CheckpointError(f"{file}: lists {shard.name}, which is missing")
  return files


def _open_weights(directory: Path) -> tuple[dict[str, Path], Callable]:
  """(tensor name -> file, read(name) -> np.ndarray) for a checkpoint dir."""
  st_index = directory / "model.safetensors.index.json"
  st_single = directory / "model.safetensors"
  pt_index = directory / "pytorch_model.bin.index.json"
  pt_single = directory / "pytorch_model.bin"
  if st_index.exists():
    files, reader = _read_index(st_index), _safetensors_reader()
  elif st_single.exists():
    reader = _safetensors_reader()
    files = {name: st_single for name in reader(st_single, None)}
  elif pt_index.exists() or pt_single.exists():
    reader = _torch_reader()
    files = (_read_index(pt_index) if pt_index.exists()
             else {name: pt_single for name in reader(pt_single, None)})
  else:
    raise CheckpointError(
        f"{directory}: no weights found (expected model.safetensors, "
        "model.safetensors.index.json or pytorch_model*.bin)")
  return files, lambda name: reader(files[name], name)


def _safetensors_reader() -> Callable:
  """read(file, name) -> array; read(file, None) -> the file's tensor names."""
  handles = {}

  def read(file: Path, name: str | None):
    try:
      if file not in handles:
        handles[file] = safe_open(str(file), framework="numpy")
      handle = handles[file]
      return list(handle.keys()) if name is None else handle.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(
          f"{file}: cannot read safetensors ({e}); the file is truncated or "
          "corrupt, download it again") from None
  return read


def _torch_reader() -> Callable:
  try:
    import torch
  except ImportError:
    raise CheckpointError(
        "this checkpoint has only PyTorch .bin weights; install torch to read "
        "them, or convert the checkpoint to safetensors") from None
  state_dicts = {}

  def read(file: Path, name: str | None):
    if file not in state_dicts:
      try:
        state_dicts.clear()  # Shards are read in order; keep one mapped.
        state_dicts[file] = torch.load(file, map_location="cpu",
                                       weights_only=True, mmap=True)
      except Exception as e:  # torch raises many types for a bad file.
        raise CheckpointError(f"{file}: cannot read PyTorch weights "
                              f"({type(e).__name__}: {e})") from None
    state = state_dicts[file]
    if name is None:
      return list(state)
    tensor = state[name]
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16 of its own.
      return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
  return read


def _to_device(array: np.ndarray) -> jax.Array:
  # Waiting for the copy lets the host buffer go before the next one is
  # filled; async transfers would otherwise pile host copies up.
  return jax.device_put(array).block_until_ready()


def load_hf(path_or_id: str | os.PathLike, dtype=jnp.bfloat16):
  """Loads a HF Llama checkpoint as `(LlamaConfig, params)`.

  Args:
    path_or_id: a local HF checkpoint directory, or `hf:ORG/NAME[@rev]`.
    dtype: parameter dtype (bfloat16, float16 or float32; or their names).

  Raises:
    CheckpointError: the checkpoint is missing, malformed or not a Llama.
  """
  dtype = as_dtype(dtype)
  directory = resolve_checkpoint(path_or_id)
  config = LlamaConfig.from_pretrained(directory)
  files, read = _open_weights(directory)
  expected = _expected_shapes(config)
  flat, used, buffers = {}, set(), {}
  tensors = list(_hf_tensors(config, expected))
  for name, path, layer, hf_shape in tqdm(tensors, desc="load_hf", unit="tensor",
                                          disable=None, leave=False):
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
      flat[path] = _to_device(tensor.astype(dtype))
      continue
    if path not in buffers:
      buffers[path] = np.empty(expected[path], dtype)
    buffers[path][layer] = tensor
    if layer == config.num_hidden_layers - 1:
      flat[path] = _to_device(buffers.pop(path))
  extra = sorted(n for n in set(files) - used if not _IGNORED_KEYS.search(n)
                 and not (config.tie_word_embeddings and n == "lm_head.weight"))
  if extra:
    raise CheckpointError(
        f"{directory}: weights hold tensors a plain Llama does not have "
        f"({', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''}); merge "
        "adapters before loading")
  return config, traverse_util.unflatten_dict(flat)


# ---- writing ----

def _parse_size(size: int | str) -> int:
  """Bytes from an int or "5GB"/"500MB" (decimal units, as transformers)."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
  if not m:
    raise CheckpointError(f"max_shard_size {size!r}: use bytes or e.g. '5GB'")
  return int(float(m[1]) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[m[2]])


def _check_params(config: LlamaConfig, params) -> dict:
  flat = traverse_util.flatten_dict(params)
  expected = _expected_shapes(config)
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
  out = _output_dir(out_dir, overwrite)
  flat = _check_params(config, params)
  dtype = as_dtype(dtype) if dtype else np.dtype(
      flat[("embed_tokens", "embedding")].dtype)
  tokenizer_dir = None
  if tokenizer_from is not None:
    tokenizer_dir = resolve_checkpoint(tokenizer_from, patterns=TOKENIZER_FILES)
    if not any((tokenizer_dir / f).exists() for f in TOKENIZER_FILES):
      raise CheckpointError(f"{tokenizer_from}: no tokenizer files "
                            f"({', '.join(TOKENIZER_FILES)})")

  shapes = {path: x.shape for path, x in flat.items()}
  tensors = list(_hf_tensors(config, shapes))
  shards, size, limit = [[]], 0, _parse_size(max_shard_size)
  for entry in tensors:
    nbytes = int(np.prod(entry[3])) * dtype.itemsize
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes

  with _writing_dir(out) as tmp:
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
      _write_json(tmp / "model.safetensors.index.json",
                  {"metadata": {"total_size": total}, "weight_map": weight_map})
    config.save(tmp, torch_dtype=dtype.name, dtype=dtype.name)
    gen = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id",
                                           "pad_token_id")
           if getattr(config, k) is not None}
    _write_json(tmp / "generation_config.json", {**gen, **(generation_config or {})})
    if tokenizer_dir is not None:
      for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).exists():
          shutil.copyfile(tokenizer_dir / f, tmp / f)
  return out


def _output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
  """`out_dir` as an absolute path, refused if it holds files and not
  `overwrite`."""
  out = Path(out_dir).expanduser().absolute()
  if out.exists() and not out.is_dir():
    raise CheckpointError(f"{out}: exists and is not a directory")
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise CheckpointError(f"{out}: exists and is not empty; choose another "
                          "directory or pass overwrite=True")
  return out


@contextlib.contextmanager
def _writing_dir(out: Path) -> Iterator[Path]:
  """A temporary sibling of `out` to write into; it replaces `out` when the
  block completes and is removed if it raises, so `out` is never partial."""
  tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
  try:
    tmp.mkdir(parents=True)
    yield tmp
    _replace_dir(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _write_json(file: Path, obj) -> None:
  with open(file, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def _replace_dir(new: Path, out: Path) -> None:
  """Moves `new` to `out`; an existing `out` is swapped out, then removed."""
  if not out.exists():
    new.rename(out)
    return
  old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
  out.rename(old)
  new.rename(out)
  shutil.rmtree(old, ignore_errors=True)
