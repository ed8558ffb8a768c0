"""Llama model configuration, spelled with Hugging Face `config.json` keys."""

import dataclasses
import json
import math
import os
from typing import Any

from longlora_jax.errors import CheckpointError
from longlora_jax.io.files import write_json

# RoPE types this implementation computes exactly. Llama-2 and LongLoRA use
# "default" and "linear" (position interpolation); the others change the
# frequencies in ways we do not implement, so they are refused, not ignored.
_SUPPORTED_ROPE_TYPES = ("default", "linear")
# Keys whose explicit `null` in config.json means something (no token, or
# "derive it"); a null anywhere else means "use the default".
_NULLABLE = ("bos_token_id", "eos_token_id", "pad_token_id",
             "num_key_value_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Linear RoPE scaling (position interpolation): positions / factor."""
  factor: float
  rope_type: str = "linear"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """A Llama-family decoder. Field names are the HF `config.json` keys.

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

  def __post_init__(self):
    # Resolve the derived defaults once so every reader sees plain ints.
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      object.__setattr__(
          self, "head_dim", self.hidden_size // self.num_attention_heads)
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    if self.num_attention_heads % self.num_key_value_heads:
      raise CheckpointError(
          f"num_attention_heads={self.num_attention_heads} is not a multiple "
          f"of num_key_value_heads={self.num_key_value_heads}")
    if self.head_dim % 2:
      raise CheckpointError(f"head_dim={self.head_dim} must be even for RoPE")

  @property
  def rope_factor(self) -> float:
    """Linear position-interpolation factor (1.0: none)."""
    return self.rope_scaling.factor if self.rope_scaling else 1.0

  @property
  def original_context(self) -> int:
    """Context length the RoPE frequencies were trained at, before scaling."""
    return int(self.max_position_embeddings)

  def with_context(self, ctx: int) -> "LlamaConfig":
    """This config extended to `ctx` tokens by linear interpolation.

    The factor is ceil(ctx / original context), as the official LongLoRA code
    computes it; `max_position_embeddings` stays the original length, which
    is how HF interprets a "linear" `rope_scaling`.
    """
    factor = float(math.ceil(ctx / self.original_context))
    return dataclasses.replace(
        self, rope_scaling=RopeScaling(factor) if factor > 1 else None)

  # ---- Hugging Face config.json ----

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json"):
    """Builds a config from a parsed HF `config.json` (transformers 4 or 5)."""
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type != "llama" and "LlamaForCausalLM" not in archs:
      raise CheckpointError(
          f"{source}: model_type={model_type!r}, architectures={archs}; "
          "only Llama-family checkpoints (model_type 'llama') are supported")
    for key in ("hidden_act",):
      if d.get(key, "silu") != "silu":
        raise CheckpointError(f"{source}: {key}={d[key]!r} is not supported "
                              "(Llama uses 'silu')")
    for key in ("attention_bias", "mlp_bias"):
      if d.get(key):
        raise CheckpointError(f"{source}: {key}=true is not supported")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                           "num_hidden_layers", "num_attention_heads")
               if k not in d]
    if missing:
      raise CheckpointError(f"{source}: missing required keys {missing}")

    rope = _parse_rope(d, source)
    fields = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling"}
    kwargs = {k: v for k, v in d.items()
              if k in fields and (v is not None or k in _NULLABLE)}
    if "rope_theta" in rope:
      kwargs["rope_theta"] = rope["rope_theta"]
    try:
      return cls(rope_scaling=rope.get("scaling"), **kwargs)
    except (TypeError, ValueError) as e:
      raise CheckpointError(f"{source}: {e}") from None

  def to_hf_dict(self) -> dict[str, Any]:
    """The HF `config.json` dict, readable by transformers 4.x and 5.x."""
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    for f in dataclasses.fields(self):
      if f.name != "rope_scaling":
        value = getattr(self, f.name)
        d[f.name] = list(value) if isinstance(value, tuple) else value
    # Both spellings: transformers 4.x reads `rope_scaling` + `rope_theta`,
    # 5.x reads `rope_parameters` (and also accepts the 4.x keys).
    if self.rope_scaling:
      d["rope_scaling"] = {"type": "linear", "rope_type": "linear",
                           "factor": self.rope_scaling.factor}
      d["rope_parameters"] = {"rope_type": "linear",
                              "factor": self.rope_scaling.factor,
                              "rope_theta": self.rope_theta}
    else:
      d["rope_scaling"] = None
      d["rope_parameters"] = {"rope_type": "default",
                              "rope_theta": self.rope_theta}
    return d

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike) -> "LlamaConfig":
    """Reads `config.json` from a checkpoint directory (or the file itself)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
      raise CheckpointError(f"{file}: not found; a Hugging Face checkpoint "
                            "directory must contain config.json")
    try:
      with open(file) as f:
        d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{file}: not valid JSON ({e})") from None
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
  out = {}
  if params.get("rope_theta") is not None:
    out["rope_theta"] = float(params["rope_theta"])
  elif d.get("rope_theta") is not None:
    out["rope_theta"] = float(d["rope_theta"])
  rope_type = params.get("rope_type") or params.get("type") or "default"
  if rope_type not in _SUPPORTED_ROPE_TYPES:
    raise CheckpointError(
        f"{source}: rope type {rope_type!r} is not supported "
        f"(supported: {', '.join(_SUPPORTED_ROPE_TYPES)})")
  if rope_type == "linear":
    factor = params.get("factor")
    if not isinstance(factor, (int, float)) or factor < 1:
      raise CheckpointError(
          f"{source}: linear rope scaling needs a factor >= 1, got {factor!r}")
    if factor > 1:
      out["scaling"] = RopeScaling(float(factor))
  return out


PRESETS = {
    "llama2-7b": LlamaConfig(),
    "llama2-13b": LlamaConfig(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40),
    "llama2-70b": LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8),
    # Llama 3.1 8B's shapes. Its config.json asks for "llama3" RoPE
    # scaling, which from_hf_dict refuses (only default and linear are
    # computed here), so the preset has plain RoPE: right for memory plans,
    # not for loading its weights.
    "llama3.1-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        rope_theta=500000.0, max_position_embeddings=131072,
        bos_token_id=128000, eos_token_id=128001),
}


def preset(name: str) -> LlamaConfig:
  if name not in PRESETS:
    raise CheckpointError(
        f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name]
