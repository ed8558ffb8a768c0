"""PEFT LoRA adapters: export (`save_peft`) and import (`load_peft`).

`save_peft` writes one PEFT directory, which PyTorch loads in full with
`PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), dir)`:

  adapter_config.json        r, lora_alpha, target_modules, modules_to_save
  adapter_model.safetensors  base_model.model.model.layers.{i}.self_attn.
                               q_proj.lora_A.weight [r, in] and
                               .lora_B.weight [out, r]; base_model.model.
                               <HF name> of each modules_to_save weight
                               (embed_tokens, input_layernorm, ..., norm)

The embedding and norms that LongLoRA trains go in as PEFT `modules_to_save`,
not as the official release's separate `trainable_params.bin`: PEFT then
restores them itself, writing needs no torch, and the keys are the official
file's keys with the `base_model.model.` prefix. The official merge script
(merge_lora_weights_and_save_hf_model.py) does not restore them: it first
adds a [PAD] token when the tokenizer has none and grows the vocabulary
(Llama-2's to 32001), and PEFT then refuses the base-sized embedding. Merge
with PEFT's `merge_and_unload` or `train.export --format hf` (README.md).

`load_peft` reads that, other PEFT LoRA adapters of a Llama, and the official
LongLoRA layout: `adapter_model.bin` (or .safetensors) with the LoRA factors
only, plus `trainable_params.bin` (or .safetensors), a state dict in HF names
(`model.embed_tokens.weight`, `model.layers.0.input_layernorm.weight`,
`model.norm.weight`: its save callback strips `base_model.model.`, which is
accepted as well).
"""

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from longlora_jax import lora
from longlora_jax.config import LlamaConfig
from longlora_jax.errors import CheckpointError
from longlora_jax.io.files import atomic_dir, output_dir, write_json
from longlora_jax.io.hf import (as_dtype, check_params, expected_shapes,
                                hf_tensors, to_host)
from longlora_jax.io.hub import resolve_checkpoint
from longlora_jax.io.weights import safetensors_reader, torch_reader

CONFIG_FILE = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TRAINABLE_FILES = ("trainable_params.safetensors", "trainable_params.bin")
_PREFIX = "base_model.model."
# Old PEFT releases and the official checkpoints may keep the adapter name.
_LORA_KEY = re.compile(r"(.+)\.lora_([AB])(?:\.default)?\.weight")
# PEFT settings that change the math: only their plain values are supported.
_PLAIN = {"use_dora": False, "fan_in_fan_out": False, "bias": "none",
          "lora_bias": False, "layers_to_transform": None,
          "rank_pattern": {}, "alpha_pattern": {},
          "trainable_token_indices": None, "target_parameters": None}


# ---- names ----

def _hf_modules(config: LlamaConfig) -> dict[str, tuple]:
  """HF module name (`model.layers.3.self_attn.q_proj`) -> (our path, layer
  or None, HF weight shape) for every weight of the base model, in HF order."""
  return {name.removesuffix(".weight"): (path, layer, shape)
          for name, path, layer, shape in
          hf_tensors(config, expected_shapes(config))}


def _in_modules_to_save(module: str, modules_to_save) -> bool:
  # PEFT's rule (utils.other._set_trainable) is a plain suffix match, so
  # "norm" also selects input_layernorm and post_attention_layernorm.
  return any(module.endswith(m) for m in modules_to_save or ())


def _is_target(module: str, target_modules) -> bool:
  # PEFT's rule (check_target_module_exists): a string is a regex for the
  # whole name; a list entry matches the name or a dotted suffix of it.
  if isinstance(target_modules, str):
    return re.fullmatch(target_modules, module) is not None
  return any(module == t or module.endswith("." + t) for t in target_modules)


# ---- export ----

def save_peft(config: LlamaConfig, params, out_dir: str | os.PathLike, *,
              extra: tuple[str, ...] = lora.LORA_PLUS,
              base_model_name_or_path: str | None = None, dtype=None,
              overwrite: bool = False) -> Path:
  """Writes the LoRA adapters and trained extras of `params` for PEFT.

  Args:
    params: with `LoRA` nodes, all of one rank and scale.
    extra: what trained besides the adapters, as `lora.trainable_mask`
      takes it; saved as `modules_to_save`. () for plain LoRA.
    base_model_name_or_path: recorded in adapter_config.json.
    dtype: of the saved tensors; default each parameter's own.
    overwrite: replace a non-empty `out_dir` (atomically).
  """
  out = output_dir(out_dir, overwrite)
  check_params(config, lora.strip(params))
  flat = traverse_util.flatten_dict(params)
  adapters = [x for x in flat.values() if lora.is_lora(x)]
  if not adapters:
    raise CheckpointError("params hold no LoRA adapters (see lora.add_lora); "
                          "save full fine-tuning with save_hf")
  ranks = sorted({x.rank for x in adapters})
  scales = sorted({x.scale for x in adapters})
  if len(ranks) > 1 or len(scales) > 1:
    raise CheckpointError(f"adapters differ in rank {ranks} or scale "
                          f"{scales}; one adapter_config.json holds one r and "
                          "lora_alpha")
  (r,), (scale,) = ranks, scales
  mask = traverse_util.flatten_dict(lora.trainable_mask(params, extra))
  modules_to_save = sorted({p[-2] for p, m in mask.items() if m is True})

  modules = _hf_modules(config)
  saved = {m: (path, layer) for m, (path, layer, _) in modules.items()
           if lora.is_lora(flat[path])
           or _in_modules_to_save(m, modules_to_save)}
  # Only what is saved comes to the host (every process takes part when
  # the parameters are sharded over several), not the frozen base weights.
  host = {}
  for path, _ in saved.values():
    x = flat[path]
    host[path] = (lora.LoRA(None, to_host(x.a), to_host(x.b), x.scale)
                  if lora.is_lora(x) else to_host(x))
  cast = (lambda x: x.astype(as_dtype(dtype))) if dtype else (lambda x: x)
  tensors, targets = {}, set()
  for module, (path, layer) in saved.items():
    x = host[path]
    if lora.is_lora(x):
      targets.add(path[-2])
      tensors[f"{_PREFIX}{module}.lora_A.weight"] = x.a[layer].T  # [r, in]
      tensors[f"{_PREFIX}{module}.lora_B.weight"] = x.b[layer].T  # [out, r]
    else:
      value = x if layer is None else x[layer]
      tensors[f"{_PREFIX}{module}.weight"] = (
          value.T if path[-1] == "kernel" else value)
  tensors = {k: np.ascontiguousarray(cast(np.asarray(v)))
             for k, v in tensors.items()}

  alpha = round(scale * r, 6)  # scale is alpha / r in floating point.
  adapter_config = {
      # Only keys that every PEFT release knows, so old ones load it too.
      "peft_type": "LORA", "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": r, "lora_alpha": int(alpha) if alpha == int(alpha) else alpha,
      "lora_dropout": 0.0, "target_modules": sorted(targets),
      "modules_to_save": modules_to_save or None, "bias": "none",
      "fan_in_fan_out": False, "inference_mode": True,
      "init_lora_weights": True,
  }
  if config.tie_word_embeddings and "embed_tokens" in modules_to_save:
    # Else PEFT swaps in the trained embedding but lm_head keeps the old one;
    # with the flag it ties them, and expects the head's copy in the file.
    adapter_config["ensure_weight_tying"] = True
    tensors[f"{_PREFIX}lm_head.weight"] = tensors[
        f"{_PREFIX}model.embed_tokens.weight"].copy()
  if jax.process_index() == 0:
    with atomic_dir(out) as tmp:
      save_file(tensors, str(tmp / ADAPTER_FILES[0]),
                metadata={"format": "pt"})
      write_json(tmp / CONFIG_FILE, adapter_config)
  return out


# ---- import ----

def _read_adapter_config(file: Path) -> dict:
  if not file.exists():
    raise CheckpointError(f"{file.parent}: no {CONFIG_FILE}; not a PEFT "
                          "adapter directory")
  try:
    cfg = json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{file}: not valid JSON ({e})") from None
  if not isinstance(cfg, dict):
    raise CheckpointError(f"{file}: expected a JSON object")
  if cfg.get("peft_type", "LORA") != "LORA":
    raise CheckpointError(f"{file}: peft_type={cfg['peft_type']!r}; only LORA "
                          "adapters are supported")
  r, alpha = cfg.get("r"), cfg.get("lora_alpha")
  if not isinstance(r, int) or isinstance(r, bool) or r < 1:
    raise CheckpointError(f"{file}: r must be a positive integer, got {r!r}")
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
    raise CheckpointError(f"{file}: lora_alpha must be a number, got {alpha!r}")
  targets = cfg.get("target_modules")
  if not (isinstance(targets, str) or (
      isinstance(targets, list) and targets
      and all(isinstance(t, str) for t in targets))):
    raise CheckpointError(f"{file}: target_modules must be a list of module "
                          f"names or a regex, got {targets!r}")
  to_save = cfg.get("modules_to_save")
  if to_save is not None and not (isinstance(to_save, list) and
                                  all(isinstance(m, str) for m in to_save)):
    raise CheckpointError(f"{file}: modules_to_save must be a list of module "
                          f"names, got {to_save!r}")
  for key, plain in _PLAIN.items():
    if cfg.get(key) not in (plain, None, [], {}):
      raise CheckpointError(f"{file}: {key}={cfg[key]!r} is not supported "
                            f"(only {key}={plain!r})")
  return cfg


def _tensor_sources(directory: Path) -> dict[str, tuple]:
  """Tensor name without `base_model.model.` -> (file, raw name, reader), over
  the adapter weights and the official trainable_params file if present; a
  tensor in both must be equal in both."""
  adapter = next((directory / f for f in ADAPTER_FILES
                  if (directory / f).exists()), None)
  if adapter is None:
    raise CheckpointError(f"{directory}: no adapter weights (expected "
                          f"{' or '.join(ADAPTER_FILES)})")
  files = [adapter] + [directory / f for f in TRAINABLE_FILES
                       if (directory / f).exists()]
  sources = {}
  for file in files:
    reader = (safetensors_reader() if file.suffix == ".safetensors"
              else torch_reader())
    for raw in reader(file, None):
      name = raw.removeprefix(_PREFIX)
      if name in sources:
        _check_same(name, sources[name], (file, raw, reader))
      else:
        sources[name] = (file, raw, reader)
  return sources


def _check_same(name, first, second) -> None:
  # Today's PEFT saves a resized embedding (and lm_head) in the adapter file
  # too, so an official run's trainable_params holds a second, equal copy.
  (file_a, raw_a, read_a), (file_b, raw_b, read_b) = first, second
  a, b = read_a(file_a, raw_a), read_b(file_b, raw_b)
  if a.shape != b.shape or not np.array_equal(a, b):
    raise CheckpointError(f"tensor {name} differs between {file_a} and "
                          f"{file_b}: delete the stale copy from one of them")


def _unknown_targets(target_modules, modules) -> list[str]:
  if isinstance(target_modules, str):
    found = any(_is_target(m, target_modules) for m in modules)
    return [] if found else [target_modules]
  return [t for t in target_modules
          if not any(_is_target(m, [t]) for m in modules)]


def _check_factors(file, module, a_RD, b_FR, r, in_f, out_f) -> None:
  if a_RD.ndim != 2 or b_FR.ndim != 2:
    raise CheckpointError(f"{file}: {module} lora_A/lora_B must be matrices, "
                          f"got shapes {a_RD.shape} and {b_FR.shape}")
  if a_RD.shape[0] != b_FR.shape[1]:
    raise CheckpointError(f"{file}: rank mismatch in {module}: lora_A has r="
                          f"{a_RD.shape[0]} but lora_B has r={b_FR.shape[1]}")
  if a_RD.shape[0] != r:
    raise CheckpointError(f"{file}: {module} has rank {a_RD.shape[0]}, but "
                          f"{CONFIG_FILE} says r={r}")
  if a_RD.shape[1] != in_f or b_FR.shape[0] != out_f:
    raise CheckpointError(
        f"{file}: {module} adapts a {a_RD.shape[1]} -> {b_FR.shape[0]} "
        f"projection, but this model's is {in_f} -> {out_f}: an adapter for "
        "another model")


def load_peft(config: LlamaConfig, params, adapter_dir: str | os.PathLike):
  """(config, params): the base model with a PEFT LoRA adapter applied.

  Targeted kernels become `LoRA` nodes (factors in the kernel's dtype); the
  weights in modules_to_save or trainable_params.* replace the base ones.
  A trained embedding with more rows than the base vocabulary (the official
  LongLoRA releases add a [PAD] token: 32001 rows) grows the vocabulary as
  their training did: the untied lm_head gains rows equal to the mean of its
  existing rows, and the returned config has the new `vocab_size`.

  Args:
    adapter_dir: a local directory or `hf:ORG/NAME[@rev]`.

  Raises:
    CheckpointError: the adapter is malformed or made for another model.
  """
  if any(map(lora.is_lora, jax.tree.leaves(params, is_leaf=lora.is_lora))):
    raise CheckpointError("params already hold LoRA adapters; pass the base "
                          "params (lora.strip or lora.merge them)")
  directory = resolve_checkpoint(
      adapter_dir, patterns=(CONFIG_FILE, *ADAPTER_FILES, *TRAINABLE_FILES))
  cfg = _read_adapter_config(directory / CONFIG_FILE)
  r, to_save = cfg["r"], cfg.get("modules_to_save")
  scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
  sources = _tensor_sources(directory)
  config, params = _grow_vocab(config, params, sources)
  flat = dict(check_params(config, params))
  modules = _hf_modules(config)
  targeted = _targeted(cfg["target_modules"], modules, directory / CONFIG_FILE)
  factors, extras = _classify(sources, modules, targeted, config)

  updates = {}  # our path -> {layer or None: tensor, [in, out] for kernels}
  for module, (file, raw, read) in extras.items():
    path, layer, hf_shape = modules[module]
    tensor = read(file, raw)
    if tuple(tensor.shape) != tuple(hf_shape):
      raise CheckpointError(f"{file}: {raw} has shape {tuple(tensor.shape)}, "
                            f"but the base model's is {tuple(hf_shape)}: "
                            "weights for another model")
    updates.setdefault(path, {})[layer] = (
        tensor.T if path[-1] == "kernel" else tensor)
  for path, rows in updates.items():
    old = flat[path]
    if None in rows:
      flat[path] = jnp.asarray(rows[None], old.dtype)
    else:
      layers = sorted(rows)
      flat[path] = old.at[np.array(layers)].set(
          jnp.asarray(np.stack([rows[i] for i in layers]), old.dtype))

  pairs = {}  # our path -> {layer: (a [in, r], b [r, out])}
  for module in targeted:
    path, layer, (out_f, in_f) = modules[module]
    for ab in "AB":
      if (module, ab) not in factors:
        raise CheckpointError(f"{directory}: the adapter lacks {module}.lora_"
                              f"{ab}.weight, which its config targets")
    (file_a, raw_a, read_a), (file_b, raw_b, read_b) = (
        factors[module, "A"], factors[module, "B"])
    a_RD, b_FR = read_a(file_a, raw_a), read_b(file_b, raw_b)
    _check_factors(file_a, module, a_RD, b_FR, r, in_f, out_f)
    pairs.setdefault(path, {})[layer] = (a_RD.T, b_FR.T)
  for path, rows in pairs.items():
    w = flat[path]
    if len(rows) != w.shape[0]:
      raise CheckpointError(f"{directory}: adapts {path[-2]} in layers "
                            f"{sorted(rows)} only; LoRA on some layers is not "
                            "supported")
    a_LDR, b_LRF = (np.stack([rows[i][j] for i in range(w.shape[0])])
                    for j in (0, 1))
    flat[path] = lora.LoRA(w, jnp.asarray(a_LDR, w.dtype),
                           jnp.asarray(b_LRF, w.dtype), scale)

  missing = [m for m in modules
             if _in_modules_to_save(m, to_save) and m not in extras]
  if missing:
    raise CheckpointError(
        f"{CONFIG_FILE} lists modules_to_save {to_save}, but "
        f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''} "
        f"{'is' if len(missing) == 1 else 'are'} in neither {ADAPTER_FILES[0]}"
        f" nor {' / '.join(TRAINABLE_FILES)}")
  return config, traverse_util.unflatten_dict(flat)


def _grow_vocab(config: LlamaConfig, params, sources):
  """Base (config, params) resized to the adapter's embedding rows, as the
  official fine-tuning's `smart_tokenizer_and_embedding_resize` did."""
  if "model.embed_tokens.weight" not in sources:
    return config, params
  file, raw, read = sources["model.embed_tokens.weight"]
  rows, width = read(file, raw).shape
  if rows <= config.vocab_size or width != config.hidden_size:
    return config, params  # Same size, or _classify names the mismatch.
  params = dict(params)
  embed = params["embed_tokens"]["embedding"]
  new = rows - config.vocab_size
  # Placeholder rows: the adapter's embedding replaces the whole table.
  params["embed_tokens"] = {"embedding": jnp.concatenate(
      [embed, jnp.zeros((new, width), embed.dtype)])}
  if not config.tie_word_embeddings:
    head_DV = params["lm_head"]["kernel"]
    mean_D1 = jnp.mean(head_DV.astype(jnp.float32), axis=1, keepdims=True)
    params["lm_head"] = {"kernel": jnp.concatenate(
        [head_DV, jnp.repeat(mean_D1, new, axis=1).astype(head_DV.dtype)], 1)}
  return dataclasses.replace(config, vocab_size=rows), params


def _targeted(target_modules, modules, file) -> list[str]:
  """The HF modules that `target_modules` selects; all must be projections."""
  unknown = _unknown_targets(target_modules, modules)
  if unknown:
    raise CheckpointError(f"{file}: target modules {unknown} do not exist in "
                          "a Llama (q_proj, k_proj, v_proj, o_proj, gate_proj, "
                          "up_proj, down_proj)")
  targeted = [m for m in modules if _is_target(m, target_modules)]
  for m in targeted:
    path = modules[m][0]
    if path[0] != "layers" or path[-1] != "kernel":
      raise CheckpointError(f"{file}: targets {m}; LoRA is supported on the "
                            "layers' linear projections only")
  return targeted


def _classify(sources, modules, targeted, config) -> tuple[dict, dict]:
  """({(module, "A" or "B"): source}, {module: source}) of the adapter's
  LoRA factors and its other (trained base) weights."""
  layers = {int(m[1]) for name in sources
            if (m := re.match(r"model\.layers\.(\d+)\.", name))}
  if layers and max(layers) + 1 != config.num_hidden_layers:
    raise CheckpointError(
        f"the adapter has weights for {max(layers) + 1} layers, this model "
        f"{config.num_hidden_layers}: an adapter for another model")
  factors, extras = {}, {}
  for name, source in sources.items():
    file = source[0]
    if config.tie_word_embeddings and name == "lm_head.weight":
      continue  # PEFT's copy of a tied embedding (ensure_weight_tying).
    match = _LORA_KEY.fullmatch(name)
    if match:
      module, ab = match.groups()
      if module not in modules:
        raise CheckpointError(f"{file}: {name} adapts {module}, which a Llama "
                              "does not have")
      if module not in targeted:
        raise CheckpointError(f"{file}: holds {name}, but {CONFIG_FILE} does "
                              "not target that module")
      factors[module, ab] = source
    elif "lora_" in name:
      raise CheckpointError(f"{file}: {name} is a kind of LoRA tensor this "
                            "loader does not support (DoRA, embedding LoRA)")
    elif name.endswith(".weight") and name.removesuffix(".weight") in modules:
      extras[name.removesuffix(".weight")] = source
    else:
      raise CheckpointError(f"{file}: tensor {name} is not a weight of this "
                            "Llama: an adapter for another model")
  return factors, extras
