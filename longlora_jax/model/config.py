"""Model configuration, spelled with Hugging Face `config.json` keys.

One decoder covers the Llama family as transformers writes it: Llama 1-3.3
(and Llama-architecture models such as SmolLM2, TinyLlama, Yi), Mistral,
Qwen2/Qwen2.5, Qwen3 (dense), OLMo 2 and Phi-3. What differs between them is data
here (read and written per family by `families`): biases on the attention
projections, RMSNorm of q and k (Qwen3 per head, OLMo 2 over the whole
projection), where the norms sit, a sliding window, the RoPE scaling type.
"""

import dataclasses
import math
import os
from typing import Any

from longlora_jax.core.errors import CheckpointError
from longlora_jax.core.files import read_json, write_json
from longlora_jax.model.families import (
    FAMILIES, FAMILY_PRESETS, NORM_PLACEMENTS, SWITCHES, global_rope,
    linear_as_longrope, linear_from_longrope, per_layer_type_rope,
    read_switches, rope_hf_dicts, write_switches)

# RoPE types computed exactly as transformers does (`rope`); others (e.g.
# "longrope") are refused, not ignored.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
# Keys whose explicit `null` in config.json means something (no token, no
# window, or "derive it"); a null anywhere else means "use the default".
_NULLABLE = ("bos_token_id", "eos_token_id", "pad_token_id",
             "num_key_value_heads", "head_dim", "sliding_window")
# RopeScaling fields that transformers reads from rope_scaling /
# rope_parameters, per type (besides rope_type and factor).
_ROPE_KEYS = {
    "default": (), "linear": (), "dynamic": (),
    "llama3": ("low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
    "yarn": ("original_max_position_embeddings", "beta_fast", "beta_slow",
             "attention_factor", "mscale", "mscale_all_dim", "truncate"),
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """A RoPE scaling type and its parameters, as transformers names them.

  "linear": positions / factor (position interpolation, LongLoRA's);
  "dynamic": NTK-aware, the base stretched with the sequence length at use;
  "yarn": YaRN (interpolation ramped by frequency, beta_fast/beta_slow, and
  an attention factor); "llama3": Llama 3.1's smooth frequency scaling.
  """
  factor: float
  rope_type: str = "linear"
  original_max_position_embeddings: int | None = None
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  beta_fast: float | None = None
  beta_slow: float | None = None
  attention_factor: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool | None = None

  def hf_dict(self) -> dict[str, Any]:
    """rope_type, factor and the type's parameters that are set."""
    keys = _ROPE_KEYS[self.rope_type]
    return {"rope_type": self.rope_type, "factor": self.factor,
            **{k: getattr(self, k) for k in keys
               if getattr(self, k) is not None}}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """A Llama-family decoder. Field names are the HF `config.json` keys,
  except the family switches that transformers derives from `model_type`:
  `qkv_bias`/`o_bias` (biases on q, k, v and on o), `qk_norm` (Qwen3's
  RMSNorm of q and k over head_dim before RoPE).

  Frozen (hashable) so it can be a static argument of `jax.jit`.
  """
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None  # None: same as attention heads.
  head_dim: int | None = None  # None: hidden_size // num_attention_heads.
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None
  model_type: str = "llama"
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False
  # "head": each head's dims (Qwen3); "projection": the whole q and k
  # projections, before they split into heads (OLMo 2).
  qk_norm_over: str = "head"
  norm_placement: str = "pre"  # see families.NORM_PLACEMENTS
  # Local layers attend to the `sliding_window` latest keys (transformers'
  # rule: q - k < window); global layers to all. Which layers are local:
  # `layer_types` where given ("sliding_attention" / "full_attention"),
  # else Qwen's layers from max_window_layers on, else every layer
  # (Mistral v0.1, Phi-3). None: no window, every layer global.
  sliding_window: int | None = None
  max_window_layers: int | None = None
  layer_types: tuple[str, ...] | None = None
  # Gemma: attention scores scaled by query_pre_attn_scalar ** -0.5 (None:
  # head_dim ** -0.5); scores and logits soft-capped, cap * tanh(x / cap).
  query_pre_attn_scalar: float | None = None
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  # Gemma 3: the default RoPE at this base on the local layers; rope_theta
  # and rope_scaling (what --ctx extends) are the global layers'.
  local_rope_theta: float | None = None

  def __post_init__(self):
    # Resolve the derived defaults once so every reader sees plain ints.
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      object.__setattr__(
          self, "head_dim", self.hidden_size // self.num_attention_heads)
    for key in ("eos_token_id", "layer_types"):
      if isinstance(getattr(self, key), list):
        object.__setattr__(self, key, tuple(getattr(self, key)))
    if self.model_type not in FAMILIES:
      raise CheckpointError(
          f"model_type {self.model_type!r} is not supported (supported: "
          f"{', '.join(FAMILIES)})")
    if self.num_attention_heads % self.num_key_value_heads:
      raise CheckpointError(
          f"num_attention_heads={self.num_attention_heads} is not a multiple "
          f"of num_key_value_heads={self.num_key_value_heads}")
    if self.head_dim % 2:
      raise CheckpointError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.layer_types is not None and (
        len(self.layer_types) != self.num_hidden_layers or not set(
            self.layer_types) <= {"full_attention", "sliding_attention"}):
      raise CheckpointError(
          f"layer_types={list(self.layer_types)}: need one of "
          "'full_attention' or 'sliding_attention' per layer "
          f"({self.num_hidden_layers})")
    if self.norm_placement not in NORM_PLACEMENTS:
      raise CheckpointError(f"norm_placement={self.norm_placement!r}; choose "
                            f"one of {NORM_PLACEMENTS}")

  @property
  def local_layers(self) -> tuple[bool, ...]:
    """Per layer, whether it attends within `sliding_window` (see there)."""
    L = self.num_hidden_layers
    if self.sliding_window is None:
      return (False,) * L
    if self.layer_types is not None:
      return tuple(t == "sliding_attention" for t in self.layer_types)
    first = self.max_window_layers or 0
    return tuple(i >= first for i in range(L))

  @property
  def fused(self) -> bool:
    """Whether q, k, v are one projection (`qkv_proj`, in that order) and
    the MLP's gate and up one (`gate_up_proj`), as Phi-3 stores them."""
    return self.model_type == "phi3"

  @property
  def gemma(self) -> bool:
    """Gemma's RMSNorm by (1 + w), embeddings times sqrt(hidden_size) and
    GeGLU (gelu, tanh approximation)."""
    return self.model_type in ("gemma2", "gemma3_text")

  @property
  def norm_weight_f32(self) -> bool:
    """Whether the RMSNorm weight multiplies in float32, before the cast
    back (OLMo 2's and Gemma's norm; Llama's: in the compute dtype)."""
    return self.model_type == "olmo2" or self.gemma

  @property
  def rope_type(self) -> str:
    return self.rope_scaling.rope_type if self.rope_scaling else "default"

  @property
  def rope_factor(self) -> float:
    """The RoPE scaling factor (1.0: none)."""
    return self.rope_scaling.factor if self.rope_scaling else 1.0

  @property
  def original_context(self) -> int:
    """Context the RoPE frequencies were pretrained at, before any scaling:
    llama3 and yarn name it, the other types keep it as
    max_position_embeddings (how transformers reads linear scaling)."""
    original = (self.rope_scaling and
                self.rope_scaling.original_max_position_embeddings)
    return int(original or self.max_position_embeddings)

  @property
  def context(self) -> int:
    """Tokens this config's RoPE is meant for: the original context times
    a linear or dynamic factor; max_position_embeddings for llama3 (Llama
    3.1: 8192 x 16); for yarn the larger of the two."""
    kind, n = self.rope_type, int(self.max_position_embeddings)
    if kind in ("linear", "dynamic") and self.local_rope_theta is None:
      return int(n * self.rope_factor)
    if kind == "yarn":
      return max(n, int(self.original_context * self.rope_factor))
    return n

  def with_context(self, ctx: int, rope: str | None = None) -> "LlamaConfig":
    """This config extended to `ctx` tokens.

    rope None: a config scaled with llama3 or yarn keeps its type, its
    factor times ceil(ctx / context) (llama3, and Gemma 3's global linear,
    also its max_position_embeddings, as they write it); others get
    LongLoRA's linear interpolation. "linear": factor ceil(ctx / original
    context), as the official code computes it. "yarn": YaRN with that
    factor over the original context (beta_fast 32, beta_slow 1). Both keep
    max_position_embeddings the original: how transformers reads "linear",
    and what 4.43-4.44 take as yarn's pretraining length."""
    kind = self.rope_type
    if rope is None:
      rope = kind if kind in ("llama3", "yarn") else "linear"
    if rope not in ("linear", "yarn", "llama3"):
      raise ValueError(f"unknown RoPE extension {rope!r}; choose linear or "
                       "yarn")
    if self.fused and rope != "linear":
      raise ValueError("transformers' Phi-3 reads linear RoPE scaling only "
                       "(as longrope); extend it with --rope linear")
    gemma3 = rope == "linear" and self.local_rope_theta is not None
    if (rope == kind and kind in ("llama3", "yarn")) or gemma3:
      m = math.ceil(ctx / self.context)
      if m <= 1:
        return self
      return dataclasses.replace(
          self, max_position_embeddings=self.max_position_embeddings * (
              1 if kind == "yarn" else m),
          rope_scaling=dataclasses.replace(
              self.rope_scaling or RopeScaling(1.0),
              factor=self.rope_factor * m))
    if rope == "llama3":
      raise ValueError("llama3 RoPE scaling extends a llama3 config only; "
                       "choose linear or yarn")
    original = self.original_context
    factor = float(math.ceil(ctx / original))
    scaling = None
    if factor > 1:
      scaling = (RopeScaling(factor) if rope == "linear" else RopeScaling(
          factor, "yarn", original_max_position_embeddings=original))
    return dataclasses.replace(self, rope_scaling=scaling,
                               max_position_embeddings=original)

  # ---- Hugging Face config.json ----

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json"):
    """Builds a config from a parsed HF `config.json` (transformers 4 or 5)."""
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type not in FAMILIES:
      raise CheckpointError(
          f"{source}: model_type={model_type!r}, architectures={archs} is not "
          f"supported; supported families: {', '.join(FAMILIES)} (dense "
          "decoders; no MoE or multimodal models)")
    gemma = model_type in ("gemma2", "gemma3_text")
    act_key = "hidden_activation" if gemma else "hidden_act"
    act = "gelu_pytorch_tanh" if gemma else "silu"
    if (d.get(act_key) or act) != act:
      raise CheckpointError(f"{source}: {act_key}={d[act_key]!r} is not "
                            f"supported ({model_type} uses {act!r})")
    if d.get("mlp_bias"):
      raise CheckpointError(f"{source}: mlp_bias=true is not supported")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                           "num_hidden_layers", "num_attention_heads")
               if k not in d]
    if missing:
      raise CheckpointError(f"{source}: missing required keys {missing}")

    rope = _parse_rope(d, source)
    family = read_switches(model_type, d)
    fields = {f.name for f in dataclasses.fields(cls)} - {
        "rope_scaling", *SWITCHES}
    kwargs = {k: v for k, v in d.items()
              if k in fields and (v is not None or k in _NULLABLE)}
    for key in ("rope_theta", "local_rope_theta"):
      if key in rope:
        kwargs[key] = rope[key]
    try:
      return cls(rope_scaling=rope.get("scaling"), **kwargs, **family)
    except (TypeError, ValueError) as e:
      raise CheckpointError(f"{source}: {e}") from None

  def to_hf_dict(self) -> dict[str, Any]:
    """The HF `config.json` dict of this family, readable by transformers
    5.x and 4.43+ (4.34+ for linear scaling, the official LongLoRA pin)."""
    d = {"architectures": [FAMILIES[self.model_type]], "hidden_act": "silu"}
    for f in dataclasses.fields(self):
      if f.name not in ("rope_scaling", *SWITCHES):
        value = getattr(self, f.name)
        d[f.name] = list(value) if isinstance(value, tuple) else value
    d.update(write_switches(self))
    d.update(rope_hf_dicts(self.rope_scaling, self.rope_theta))
    if self.local_rope_theta is not None:
      d.update(per_layer_type_rope(self, d))
    if self.fused and self.rope_scaling:  # transformers' Phi-3: longrope only
      d.update(linear_as_longrope(self))
    return d

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike) -> "LlamaConfig":
    """Reads `config.json` from a checkpoint directory (or the file itself)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    d = read_json(file, error=CheckpointError, missing=(
        f"{file}: not found; a Hugging Face checkpoint directory must "
        "contain config.json"))
    if not isinstance(d, dict):
      raise CheckpointError(f"{file}: expected a JSON object")
    return cls.from_hf_dict(d, source=str(file))

  def save(self, directory: str | os.PathLike, **extra) -> None:
    write_json(os.path.join(directory, "config.json"),
               {**self.to_hf_dict(), **extra})


def _parse_rope(d: dict[str, Any], source: str) -> dict[str, Any]:
  """RoPE theta and scaling from either transformers spelling."""
  params = d.get("rope_parameters") or d.get("rope_scaling") or {}
  if not isinstance(params, dict):
    raise CheckpointError(f"{source}: rope scaling must be an object, "
                          f"got {params!r}")
  params, out = global_rope(d, params, source)
  if params.get("rope_theta") is not None:
    out["rope_theta"] = float(params["rope_theta"])
  elif d.get("rope_theta") is not None:
    out["rope_theta"] = float(d["rope_theta"])
  rope_type = params.get("rope_type") or params.get("type") or "default"
  if rope_type == "longrope":
    factor = linear_from_longrope(params)
    if factor is None:
      raise CheckpointError(
          f"{source}: rope type 'longrope' (Phi-3 128k) is not supported; "
          "extend the 4k model instead (e.g. Phi-3-mini-4k-instruct), whose "
          "default RoPE --ctx interpolates")
    rope_type, params = "linear", {"factor": factor}
  if rope_type not in ROPE_TYPES:
    raise CheckpointError(
        f"{source}: rope type {rope_type!r} is not supported "
        f"(supported: {', '.join(ROPE_TYPES)})")
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise CheckpointError(f"{source}: partial_rotary_factor "
                          f"{params['partial_rotary_factor']} is not supported")
  if rope_type == "default":
    return out
  factor = params.get("factor")
  original = (params.get("original_max_position_embeddings")
              or d.get("original_max_position_embeddings"))
  if rope_type in ("llama3", "yarn"):
    original = original or d.get("max_position_embeddings")
    if factor is None and rope_type == "yarn" and original:
      factor = d["max_position_embeddings"] / original  # transformers' rule
  if not isinstance(factor, (int, float)) or factor < 1:
    raise CheckpointError(
        f"{source}: {rope_type} rope scaling needs a factor >= 1, got "
        f"{factor!r}")
  if rope_type == "llama3" and not all(
      isinstance(params.get(k), (int, float))
      for k in ("low_freq_factor", "high_freq_factor")):
    raise CheckpointError(f"{source}: llama3 rope scaling needs "
                          "low_freq_factor and high_freq_factor")
  extra = {k: params[k] for k in _ROPE_KEYS[rope_type]
           if params.get(k) is not None}
  if rope_type in ("llama3", "yarn"):
    extra["original_max_position_embeddings"] = int(original)
  if rope_type == "linear" and factor == 1:
    return out
  out["scaling"] = RopeScaling(float(factor), rope_type, **extra)
  return out


_LLAMA3_ROPE = RopeScaling(8.0, "llama3", original_max_position_embeddings=8192,
                           low_freq_factor=1.0, high_freq_factor=4.0)
PRESETS = {
    "llama2-7b": LlamaConfig(),
    "llama2-13b": LlamaConfig(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40),
    "llama2-70b": LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8),
    "llama3.1-8b": LlamaConfig(
        vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
        rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
        max_position_embeddings=131072, bos_token_id=128000,
        eos_token_id=128001),
    "llama3.1-70b": LlamaConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
        max_position_embeddings=131072, bos_token_id=128000,
        eos_token_id=128001),
    "qwen2.5-7b": LlamaConfig(
        model_type="qwen2", vocab_size=152064, hidden_size=3584,
        intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, qkv_bias=True, bos_token_id=151643,
        eos_token_id=151643),
    "mistral-7b": LlamaConfig(  # v0.3: no sliding window
        model_type="mistral", vocab_size=32768, intermediate_size=14336,
        num_key_value_heads=8, rope_theta=1000000.0,
        max_position_embeddings=32768),
    **{n: LlamaConfig.from_hf_dict(d, n) for n, d in FAMILY_PRESETS.items()},
}


def preset(name: str) -> LlamaConfig:
  if name not in PRESETS:
    raise CheckpointError(
        f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name]
