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
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from longlora_jax.model import lora
from longlora_jax.model.config import LlamaConfig
from longlora_jax.core.errors import CheckpointError
from longlora_jax.core.files import atomic_dir, output_dir, write_json
from longlora_jax.checkpoints.hf import as_dtype, check_params, to_host
from longlora_jax.checkpoints.hub import resolve_checkpoint
from longlora_jax.checkpoints.weights import write_safetensors
from longlora_jax.checkpoints.peft.layout import (
    ADAPTER_FILES, CONFIG_FILE, PREFIX, TRAINABLE_FILES, check_factors,
    classify, hf_modules, in_modules_to_save, read_adapter_config,
    targeted_modules, tensor_sources)


def save_peft(config: LlamaConfig, params, out_dir: str | os.PathLike, *,
              extra: tuple[str, ...] = lora.LORA_PLUS,
              base_model_name_or_path: str | None = None, dtype=None,
              overwrite: bool = False, card: str | None = None) -> Path:
  """Writes the LoRA adapters and trained extras of `params` for PEFT.

  Args:
    params: with `LoRA` nodes, all of one rank and scale.
    extra: what trained besides the adapters, as `lora.trainable_mask`
      takes it; saved as `modules_to_save`. () for plain LoRA.
    base_model_name_or_path: recorded in adapter_config.json.
    dtype: of the saved tensors; default each parameter's own.
    overwrite: replace a non-empty `out_dir` (atomically).
    card: the model card, written as README.md (where PEFT writes its own).
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

  modules = hf_modules(config)
  saved = {m: (path, layer) for m, (path, layer, _) in modules.items()
           if lora.is_lora(flat[path])
           or in_modules_to_save(m, modules_to_save)}
  # Only what is saved comes to the host (every process takes part when
  # the parameters are sharded over several), not the frozen base weights.
  # Cast shard by shard as they come (float32 trainables, the embedding
  # among them, are never whole on the host in float32).
  host = {}
  to = lambda x: to_host(x, as_dtype(dtype) if dtype else None)
  for path, _ in saved.values():
    x = flat[path]
    host[path] = (lora.LoRA(None, to(x.a), to(x.b), x.scale)
                  if lora.is_lora(x) else to(x))
  tensors, targets = {}, set()
  for module, (path, layer) in saved.items():
    x = host[path]
    if lora.is_lora(x):
      targets.add(path[-2])
      tensors[f"{PREFIX}{module}.lora_A.weight"] = x.a[layer].T  # [r, in]
      tensors[f"{PREFIX}{module}.lora_B.weight"] = x.b[layer].T  # [out, r]
    else:
      value = x if layer is None else x[layer]
      tensors[f"{PREFIX}{module}.weight"] = (
          value.T if path[-1] == "kernel" else value)
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}

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
    tensors[f"{PREFIX}lm_head.weight"] = tensors[
        f"{PREFIX}model.embed_tokens.weight"].copy()
  if jax.process_index() == 0:
    with atomic_dir(out) as tmp:
      write_safetensors(tmp / ADAPTER_FILES[0],
                        [(k, v.shape, v.dtype) for k, v in tensors.items()],
                        tensors.values(), metadata={"format": "pt"})
      write_json(tmp / CONFIG_FILE, adapter_config)
      if card is not None:
        (tmp / "README.md").write_text(card)
  return out


def load_peft(config: LlamaConfig, params, adapter_dir: str | os.PathLike):
  """(config, params): the base model with a PEFT LoRA adapter applied.

  Targeted kernels become `LoRA` nodes (factors in the kernel's dtype); the
  weights in modules_to_save or trainable_params.* replace the base ones.
  A tied base whose adapter trains the embedding without PEFT's
  `ensure_weight_tying` comes back untied, as PEFT runs it (`_untie`).
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
  cfg = read_adapter_config(directory / CONFIG_FILE)
  r, to_save = cfg["r"], cfg.get("modules_to_save")
  scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
  sources = tensor_sources(directory)
  config, params = _untie(config, params, sources, cfg)
  config, params = _grow_vocab(config, params, sources)
  flat = dict(check_params(config, params))
  modules = hf_modules(config)
  targeted = targeted_modules(cfg["target_modules"], modules, directory / CONFIG_FILE)
  factors, extras = classify(sources, modules, targeted, config)

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
    check_factors(file_a, module, a_RD, b_FR, r, in_f, out_f)
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
             if in_modules_to_save(m, to_save) and m not in extras]
  if missing:
    raise CheckpointError(
        f"{CONFIG_FILE} lists modules_to_save {to_save}, but "
        f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''} "
        f"{'is' if len(missing) == 1 else 'are'} in neither {ADAPTER_FILES[0]}"
        f" nor {' / '.join(TRAINABLE_FILES)}")
  return config, traverse_util.unflatten_dict(flat)


def _untie(config: LlamaConfig, params, sources, cfg):
  """A tied base whose adapter trains the embedding without PEFT's
  `ensure_weight_tying`: PEFT swaps in the trained embedding and leaves the
  output head the base one (a PEFT adapter of Gemma 2 or 3 made with
  modules_to_save embed_tokens, by default). So are we: untied, the base
  embedding as lm_head."""
  if (not config.tie_word_embeddings or cfg.get("ensure_weight_tying")
      or "model.embed_tokens.weight" not in sources):
    return config, params
  embed_VD = params["embed_tokens"]["embedding"]
  params = {**params, "lm_head": {"kernel": embed_VD.T}}
  return dataclasses.replace(config, tie_word_embeddings=False), params


def _grow_vocab(config: LlamaConfig, params, sources):
  """Base (config, params) resized to the adapter's embedding rows, as the
  official fine-tuning's `smart_tokenizer_and_embedding_resize` did."""
  if "model.embed_tokens.weight" not in sources:
    return config, params
  file, raw, read = sources["model.embed_tokens.weight"]
  rows, width = read(file, raw).shape
  if rows <= config.vocab_size or width != config.hidden_size:
    return config, params  # Same size, or classify names the mismatch.
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


