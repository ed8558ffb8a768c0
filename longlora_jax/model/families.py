"""What each supported family's `config.json` says beyond Llama's keys.

A family is data, not code: the switches `LlamaConfig` carries (biases, q/k
norms, where the norms sit, a sliding window), read from and written back
to the keys transformers uses for that `model_type`.
"""

from typing import Any

from longlora_jax.core.errors import CheckpointError

# model_type -> the transformers class that a checkpoint of it loads as.
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "olmo2": "Olmo2ForCausalLM", "phi3": "Phi3ForCausalLM",
            "gemma2": "Gemma2ForCausalLM",
            "gemma3_text": "Gemma3ForCausalLM"}
# LlamaConfig fields that are family switches, not config.json keys.
SWITCHES = ("qkv_bias", "o_bias", "qk_norm", "qk_norm_over", "norm_placement",
            "sliding_window", "max_window_layers", "layer_types",
            "query_pre_attn_scalar", "attn_logit_softcapping",
            "final_logit_softcapping", "local_rope_theta")
# Gemma's keys, read and written as they are.
_GEMMA_KEYS = ("query_pre_attn_scalar", "attn_logit_softcapping",
               "final_logit_softcapping", "sliding_window", "layer_types")
# Where a layer's RMSNorms sit: "pre" normalises each block's input (Llama:
# input_layernorm, post_attention_layernorm before the MLP); "post" each
# block's output before it joins the residual (OLMo 2: post_attention_
# layernorm, post_feedforward_layernorm); "both" both (Gemma: input_
# layernorm, post_attention_layernorm, pre_ and post_feedforward_layernorm).
NORM_PLACEMENTS = ("pre", "post", "both")


def _biases(d: dict[str, Any], qkv: bool | None = None) -> dict[str, bool]:
  """attention_bias sets the biases of q, k, v and o (Llama, Qwen3, OLMo 2)."""
  bias = bool(d.get("attention_bias", False))
  return {"qkv_bias": bias if qkv is None else qkv, "o_bias": bias and qkv is
          None}


def _window(d: dict[str, Any], switch: str | None = None) -> dict[str, Any]:
  """Mistral's sliding_window (every layer); Qwen's only where
  use_sliding_window, on its layers from max_window_layers on (transformers'
  default 28), or as its layer_types say."""
  on = d.get(switch, False) if switch else True
  window = d.get("sliding_window") if on else None
  if not window:
    return {"sliding_window": None}
  if not switch:
    return {"sliding_window": window}
  return {"sliding_window": window,
          "max_window_layers": d.get("max_window_layers", 28),
          "layer_types": d.get("layer_types")}


# model_type -> the family switches from its config.json.
_READ = {
    "llama": lambda d: {**_biases(d), **_window({})},
    "mistral": lambda d: {**_biases({}), **_window(d)},
    "qwen2": lambda d: {**_biases(d, qkv=True),
                        **_window(d, "use_sliding_window")},
    "qwen3": lambda d: {**_biases(d), "qk_norm": True,
                        **_window(d, "use_sliding_window")},
    # OLMo 2: RMSNorm of the whole q and k projections, norms after blocks.
    "olmo2": lambda d: {**_biases(d), **_window({}), "qk_norm": True,
                        "qk_norm_over": "projection", "norm_placement": "post"},
    # Phi-3: fused qkv_proj and gate_up_proj (`LlamaConfig.fused`), a
    # window on every layer where sliding_window is set.
    "phi3": lambda d: {**_biases({}), **_window(d)},
    # Gemma 2: RMSNorm by (1 + w), four norms a layer, soft-capping,
    # local and global layers alternating as layer_types say.
    "gemma2": lambda d: {**_biases(d), "norm_placement": "both",
                         **{k: d.get(k) for k in _GEMMA_KEYS}},
    # Gemma 3: as Gemma 2, with q/k RMSNorm per head; local layers keep
    # their own RoPE base (`LlamaConfig.local_rope_theta`).
    "gemma3_text": lambda d: {**_biases(d), "norm_placement": "both",
                              "qk_norm": True,
                              **{k: d.get(k) for k in _GEMMA_KEYS}},
}


def read_switches(model_type: str, d: dict[str, Any]) -> dict[str, Any]:
  """The LlamaConfig switches of a `model_type` from its config.json `d`."""
  return _READ[model_type](d)


def write_switches(config) -> dict[str, Any]:
  """The config.json keys of `config`'s family that say its switches."""
  window = {"sliding_window": config.sliding_window}
  gemma = {"attention_bias": config.qkv_bias,
           "hidden_activation": "gelu_pytorch_tanh",
           "hidden_act": "gelu_pytorch_tanh",
           **{k: getattr(config, k) for k in _GEMMA_KEYS},
           "layer_types": _layer_types(config)}
  if config.model_type in ("qwen2", "qwen3"):
    window = {"use_sliding_window": config.sliding_window is not None,
              "sliding_window": config.sliding_window,
              "max_window_layers": (config.max_window_layers
                                    or config.num_hidden_layers),
              "layer_types": _layer_types(config)}
  return {
      "llama": {"attention_bias": config.qkv_bias, "mlp_bias": False},
      "mistral": window,
      "qwen2": window,
      "qwen3": {"attention_bias": config.qkv_bias, **window},
      "olmo2": {"attention_bias": config.qkv_bias},
      "phi3": window,
      "gemma2": gemma,
      "gemma3_text": gemma,
  }[config.model_type]


def _layer_types(config) -> list[str]:
  """transformers' `layer_types` of `config` (see `LlamaConfig.local_layers`)."""
  return ["sliding_attention" if local else "full_attention"
          for local in config.local_layers]


def rope_hf_dicts(scaling, theta: float) -> dict:
  """`rope_scaling` (transformers 4.x) and `rope_parameters` (5.x).

  Linear and dynamic scaling are written with exactly the keys `type` and
  `factor`, which transformers 4.34-4.42 require (the official LongLoRA
  pins 4.34); llama3 and yarn exist from 4.43, in its `rope_type` format.
  """
  if scaling is None:
    return {"rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
  params = scaling.hf_dict()
  legacy = ({"type": scaling.rope_type, "factor": scaling.factor}
            if scaling.rope_type in ("linear", "dynamic") else params)
  return {"rope_scaling": legacy,
          "rope_parameters": {**params, "rope_theta": theta}}


def per_layer_type_rope(config, rope: dict[str, Any]) -> dict[str, Any]:
  """Gemma 3's RoPE per layer type: `rope` (`rope_hf_dicts`) on the global
  layers, the default RoPE at `local_rope_theta` on the local ones, in
  transformers 5's spelling and 4.x's (`rope_local_base_freq`)."""
  return {**rope, "rope_theta": config.rope_theta,
          "rope_local_base_freq": config.local_rope_theta,
          "rope_parameters": {
              "full_attention": rope["rope_parameters"],
              "sliding_attention": {"rope_type": "default",
                                    "rope_theta": config.local_rope_theta}}}


def global_rope(d: dict[str, Any], params: dict[str, Any], source: str):
  """(the global layers' RoPE parameters, {"local_rope_theta": base} for
  Gemma 3) from a config.json `d` whose RoPE parameters are `params`."""
  local = d.get("rope_local_base_freq")  # Gemma 3 in transformers 4.x
  if "full_attention" in params:  # per layer type (transformers 5)
    local_params = params.get("sliding_attention") or {}
    if local_params.get("rope_type", "default") != "default":
      raise CheckpointError(
          f"{source}: rope_parameters.sliding_attention is "
          f"{local_params['rope_type']!r}; only the default RoPE is supported "
          "on local layers")
    local = local_params.get("rope_theta", local)
    params = params["full_attention"]
  if local is None or d.get("model_type") != "gemma3_text":
    return params, {}
  return params, {"local_rope_theta": float(local)}


def linear_as_longrope(config) -> dict[str, Any]:
  """Linear position interpolation by f, written as the one RoPE type
  transformers' Phi-3 takes: longrope with every short and long factor f
  (frequencies / f, which is positions / f, at any length) and attention
  factor 1. Phi-3 reads no other scaling."""
  if config.rope_type != "linear":
    raise ValueError(f"Phi-3 takes linear RoPE scaling only (as longrope), "
                     f"not {config.rope_type}; extend it with --rope linear")
  factors = [config.rope_factor] * (config.head_dim // 2)
  params = {"rope_type": "longrope", "short_factor": factors,
            "long_factor": factors, "attention_factor": 1.0,
            "original_max_position_embeddings":
                config.max_position_embeddings}
  return {"rope_scaling": params,
          "rope_parameters": {**params, "rope_theta": config.rope_theta},
          "original_max_position_embeddings": config.max_position_embeddings}


def linear_from_longrope(params: dict[str, Any]) -> float | None:
  """The factor of a longrope that is linear interpolation (as
  `linear_as_longrope` writes it), else None."""
  short, long = params.get("short_factor"), params.get("long_factor")
  if (not short or short != long or len(set(short)) != 1
      or params.get("attention_factor") != 1.0):
    return None
  return float(short[0])


_GEMMA = dict(rms_norm_eps=1e-6, head_dim=256, query_pre_attn_scalar=256,
              tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
              bos_token_id=2)
# Memory-plan presets (`config.PRESETS`) of these families, as the
# checkpoints' config.json say.
FAMILY_PRESETS = {
    "gemma2-9b": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=3584,
        intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, sliding_window=4096,
        max_position_embeddings=8192, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, rope_theta=10000.0,
        layer_types=["sliding_attention", "full_attention"] * 21, **_GEMMA),
    "gemma3-4b": dict(
        model_type="gemma3_text", vocab_size=262208, hidden_size=2560,
        intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
        num_key_value_heads=4, sliding_window=1024,
        max_position_embeddings=131072, layer_types=[
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
            for i in range(34)],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0,
                               "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": 10000.0}}, **_GEMMA),
    "olmo2-7b": dict(
        model_type="olmo2", vocab_size=100352, hidden_size=4096,
        intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096,
        rope_theta=500000.0, rms_norm_eps=1e-6, pad_token_id=100277,
        bos_token_id=None, eos_token_id=100257),
    "phi3-mini": dict(  # Phi-3-mini-4k-instruct
        model_type="phi3", vocab_size=32064, hidden_size=3072,
        intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096,
        sliding_window=2047, rope_theta=10000.0, bos_token_id=1,
        eos_token_id=32000, pad_token_id=32000),
}
