"""The PEFT adapter format: file and tensor names, PEFT's module-matching
rules, and reading an adapter directory with every check a malformed or
foreign adapter should fail (`io.peft` builds on these)."""

import re
from pathlib import Path

import numpy as np

from longlora_jax.model.config import LlamaConfig
from longlora_jax.core.errors import CheckpointError
from longlora_jax.core.files import read_json
from longlora_jax.checkpoints.hf import expected_shapes, hf_tensors
from longlora_jax.checkpoints.weights import safetensors_reader, torch_reader

CONFIG_FILE = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TRAINABLE_FILES = ("trainable_params.safetensors", "trainable_params.bin")
PREFIX = "base_model.model."
# Old PEFT releases and the official checkpoints may keep the adapter name.
LORA_KEY = re.compile(r"(.+)\.lora_([AB])(?:\.default)?\.weight")
# PEFT settings that change the math: only their plain values are supported.
PLAIN = {"use_dora": False, "fan_in_fan_out": False, "bias": "none",
         "lora_bias": False, "layers_to_transform": None,
         "rank_pattern": {}, "alpha_pattern": {},
         "trainable_token_indices": None, "target_parameters": None}


def hf_modules(config: LlamaConfig) -> dict[str, tuple]:
  """HF module name (`model.layers.3.self_attn.q_proj`) -> (our path, layer
  or None, HF weight shape) for every weight of the base model, in HF order."""
  return {name.removesuffix(".weight"): (path, layer, shape)
          for name, path, layer, shape in
          hf_tensors(config, expected_shapes(config))}


def in_modules_to_save(module: str, modules_to_save) -> bool:
  # PEFT's rule (utils.other._set_trainable) is a plain suffix match, so
  # "norm" also selects input_layernorm and post_attention_layernorm.
  return any(module.endswith(m) for m in modules_to_save or ())


def is_target(module: str, target_modules) -> bool:
  # PEFT's rule (check_target_module_exists): a string is a regex for the
  # whole name; a list entry matches the name or a dotted suffix of it.
  if isinstance(target_modules, str):
    return re.fullmatch(target_modules, module) is not None
  return any(module == t or module.endswith("." + t) for t in target_modules)


def read_adapter_config(file: Path) -> dict:
  cfg = read_json(file, error=CheckpointError, missing=(
      f"{file.parent}: no {CONFIG_FILE}; not a PEFT adapter directory"))
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
  for key, plain in PLAIN.items():
    if cfg.get(key) not in (plain, None, [], {}):
      raise CheckpointError(f"{file}: {key}={cfg[key]!r} is not supported "
                            f"(only {key}={plain!r})")
  return cfg


def tensor_sources(directory: Path) -> dict[str, tuple]:
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
      name = raw.removeprefix(PREFIX)
      if name in sources:
        check_same(name, sources[name], (file, raw, reader))
      else:
        sources[name] = (file, raw, reader)
  return sources


def check_same(name, first, second) -> None:
  # Today's PEFT saves a resized embedding (and lm_head) in the adapter file
  # too, so an official run's trainable_params holds a second, equal copy.
  (file_a, raw_a, read_a), (file_b, raw_b, read_b) = first, second
  a, b = read_a(file_a, raw_a), read_b(file_b, raw_b)
  if a.shape != b.shape or not np.array_equal(a, b):
    raise CheckpointError(f"tensor {name} differs between {file_a} and "
                          f"{file_b}: delete the stale copy from one of them")


def unknown_targets(target_modules, modules) -> list[str]:
  if isinstance(target_modules, str):
    found = any(is_target(m, target_modules) for m in modules)
    return [] if found else [target_modules]
  return [t for t in target_modules
          if not any(is_target(m, [t]) for m in modules)]


def check_factors(file, module, a_RD, b_FR, r, in_f, out_f) -> None:
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


def targeted_modules(target_modules, modules, file) -> list[str]:
  """The HF modules that `target_modules` selects; all must be projections."""
  unknown = unknown_targets(target_modules, modules)
  if unknown:
    raise CheckpointError(f"{file}: target modules {unknown} do not exist in "
                          "a Llama (q_proj, k_proj, v_proj, o_proj, gate_proj, "
                          "up_proj, down_proj)")
  targeted = [m for m in modules if is_target(m, target_modules)]
  for m in targeted:
    path = modules[m][0]
    if path[0] != "layers" or path[-1] != "kernel":
      raise CheckpointError(f"{file}: targets {m}; LoRA is supported on the "
                            "layers' linear projections only")
  return targeted


def classify(sources, modules, targeted, config) -> tuple[dict, dict]:
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
    match = LORA_KEY.fullmatch(name)
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
