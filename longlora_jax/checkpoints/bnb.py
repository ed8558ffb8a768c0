"""bitsandbytes 4-bit (NF4) checkpoints, the `*-bnb-4bit` repositories, read
straight into `NF4Tensor`s with NumPy (no torch, no bitsandbytes).

transformers saves each quantized linear `X.weight` as bitsandbytes'
`QuantState.as_dict(packed=True)` lays it out:

  X.weight                                uint8 [ceil(n / 2), 1], the codes
  X.weight.absmax                         float32 [blocks]; uint8 if nested
  X.weight.quant_map                      float32 [16], the NF4 codes
  X.weight.nested_absmax                  float32 [ceil(blocks / 256)]  (nested)
  X.weight.nested_quant_map               float32 [256]                 (nested)
  X.weight.quant_state.bitsandbytes__nf4  uint8, the bytes of a JSON object:
      quant_type, blocksize, dtype, shape, and when nested nested_blocksize,
      nested_dtype, nested_offset

The blocks are kept as they are, nothing is requantized, so `dequantize`
gives what bitsandbytes' `dequantize_4bit` gives.
"""

import json
import math
import os
from pathlib import Path

import numpy as np

from longlora_jax.checkpoints.weights import Weights, open_weights
from longlora_jax.core.errors import CheckpointError
from longlora_jax.model.nf4 import NF4_CODE, NF4Tensor

_STATE = ".quant_state.bitsandbytes__"
_REQUANTIZE = ("download the checkpoint again, or quantize the original "
               "weights with transformers' BitsAndBytesConfig(load_in_4bit="
               "True, bnb_4bit_quant_type='nf4')")


def checkpoint_quantization(config: dict, source: str) -> str | None:
  """"nf4" for a bitsandbytes NF4 checkpoint (its config.json's
  `quantization_config`), None for an unquantized one; a one-line error
  for the quantizations that are not read (bitsandbytes' fp4 and 8-bit,
  and other methods)."""
  q = config.get("quantization_config")
  if not q:
    return None
  method = q.get("quant_method") if isinstance(q, dict) else None
  if method != "bitsandbytes":
    raise CheckpointError(
        f"{source}: quantized with {method!r}; only bitsandbytes NF4 "
        "checkpoints are read: load the unquantized checkpoint (and pass "
        "--quantize nf4 for 4-bit weights)")
  if not q.get("load_in_4bit") or q.get("bnb_4bit_quant_type") != "nf4":
    kind = ("8-bit" if q.get("load_in_8bit") else
            f"4-bit {q.get('bnb_4bit_quant_type')!r}")
    raise CheckpointError(
        f"{source}: bitsandbytes {kind} weights are not read, only NF4: "
        "load the unquantized checkpoint with --quantize nf4, or one saved "
        "with BitsAndBytesConfig(load_in_4bit=True, "
        "bnb_4bit_quant_type='nf4')")
  return "nf4"


def quantized_names(weights: Weights) -> list[str]:
  """The names of the 4-bit weights (`X.weight`) among `weights`."""
  return sorted(name.split(_STATE)[0] for name in weights.files
                if _STATE in name)


def _fail(name: str, problem: str, fix: str = _REQUANTIZE):
  raise CheckpointError(f"{name}: {problem}; {fix}")


def _read(weights: Weights, name: str, dtype, size: int | None):
  """The tensor `name`, flat, checked to be `dtype` with `size` values."""
  if name not in weights.files:
    _fail(name, "missing from the checkpoint")
  value = weights.read(name)
  if value.dtype != dtype:
    _fail(name, f"is {value.dtype}, bitsandbytes writes {np.dtype(dtype)}")
  if size is not None and value.size != size:
    _fail(name, f"has {value.size} values where its quant state implies "
          f"{size}")
  return value.reshape(-1)


def _positive_int(state: dict, key: str, name: str) -> int:
  value = state.get(key)
  if type(value) is not int or value <= 0:
    _fail(name, f"quant state has {key}={value!r}, not a positive integer")
  return value


def _quant_state(weights: Weights, key: str) -> dict:
  """The JSON object in `key`'s bytes, its fields checked."""
  raw = _read(weights, key, np.uint8, None)
  try:
    state = json.loads(raw.tobytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    _fail(key, f"is not bitsandbytes' JSON quant state ({e})")
  if not isinstance(state, dict):
    _fail(key, f"is not bitsandbytes' JSON quant state (a {type(state)})")
  if state.get("quant_type") != "nf4":
    _fail(key, f"says quant_type={state.get('quant_type')!r}, not 'nf4'")
  _positive_int(state, "blocksize", key)
  shape = state.get("shape")
  if (not isinstance(shape, list) or not shape
      or any(type(d) is not int or d <= 0 for d in shape)):
    _fail(key, f"has shape={shape!r}, not a list of positive integers")
  if "nested_offset" in state:
    _positive_int(state, "nested_blocksize", key)
    if state.get("nested_dtype") != "float32":
      _fail(key, f"has nested_dtype={state.get('nested_dtype')!r}; only "
            "float32 nested absmaxes (what bitsandbytes writes) are read")
    if type(state["nested_offset"]) not in (int, float):
      _fail(key, f"has nested_offset={state['nested_offset']!r}, not a number")
  return state


def read_nf4(weights: Weights, name: str) -> NF4Tensor:
  """The 4-bit weight `name` (`X.weight`) as an NF4Tensor of the shape it
  was quantized in (torch's [out, in])."""
  keys = [k for k in weights.files if k.startswith(name + _STATE)]
  if len(keys) != 1:
    _fail(name, f"has {len(keys)} bitsandbytes quant states "
          f"({name}{_STATE}nf4 expected)")
  quant_type = keys[0][len(name + _STATE):]
  if quant_type != "nf4":
    _fail(name, f"is quantized to bitsandbytes' {quant_type!r}; only 'nf4' "
          "is read", "quantize the original weights with bnb_4bit_quant_type"
          "='nf4', or load the unquantized checkpoint")
  state = _quant_state(weights, keys[0])
  shape, blocksize = tuple(state["shape"]), state["blocksize"]
  n = math.prod(shape)
  blocks = -(-n // blocksize)
  packed = _read(weights, name, np.uint8, -(-n // 2))
  code = _read(weights, f"{name}.quant_map", np.float32, 16)
  if not np.array_equal(code, NF4_CODE):
    _fail(f"{name}.quant_map", "differs from bitsandbytes' NF4 codes")
  if "nested_offset" not in state:
    absmax = _read(weights, f"{name}.absmax", np.float32, blocks)
    return NF4Tensor(packed, absmax, shape=shape, blocksize=blocksize)
  nested_blocksize = state["nested_blocksize"]
  return NF4Tensor(
      packed, _read(weights, f"{name}.absmax", np.uint8, blocks),
      _read(weights, f"{name}.nested_absmax", np.float32,
            -(-blocks // nested_blocksize)),
      _read(weights, f"{name}.nested_quant_map", np.float32, 256),
      # The float32 offset went through JSON as a double: exact both ways.
      np.asarray(state["nested_offset"], np.float32), shape, blocksize,
      nested_blocksize)


def read_bnb_4bit(directory: str | os.PathLike) -> dict[str, NF4Tensor]:
  """Every 4-bit weight of a bitsandbytes checkpoint directory, by name
  (`model.layers.0.self_attn.q_proj.weight`); the checkpoint's other tensors
  are plain and read as usual."""
  weights = open_weights(Path(directory))
  names = quantized_names(weights)
  if not names:
    raise CheckpointError(
        f"{directory}: no bitsandbytes 4-bit weights (no tensor named "
        f"'*{_STATE}nf4'); load it as an unquantized checkpoint")
  return {name: read_nf4(weights, name) for name in names}
