"""bitsandbytes 4-bit checkpoints: a tiny Llama quantized and saved by
transformers + bitsandbytes reads into NF4Tensors that dequantize to what
bitsandbytes dequantizes; a malformed or non-NF4 one is refused in a line."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from longlora_jax.checkpoints import bnb
from longlora_jax.core.errors import CheckpointError
from longlora_jax.model import nf4

LINEARS = [f"model.layers.{i}.{part}.weight" for i in range(2)
           for part in ("self_attn.q_proj", "self_attn.k_proj",
                        "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                        "mlp.up_proj", "mlp.down_proj")]
# (double quantization, the dtype transformers loads and quantizes in)
CASES = [(False, "float32"), (True, "bfloat16")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """A tiny Llama's directory, and its NF4 checkpoints by CASES entry."""
  torch = pytest.importorskip("torch", reason="needs torch (bitsandbytes "
                              "runs on it)")
  pytest.importorskip("bitsandbytes",
                      reason="needs bitsandbytes (the NF4 reference)")
  import transformers
  root = tmp_path_factory.mktemp("bnb")
  config = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
  out = {}
  for double_quant, dtype in CASES:
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, dtype))
    model = transformers.LlamaForCausalLM.from_pretrained(
        root / "base", quantization_config=quantization, device_map="cpu",
        dtype=getattr(torch, dtype))
    out[double_quant, dtype] = root / f"nf4_{dtype}_{double_quant}"
    model.save_pretrained(out[double_quant, dtype])
  return root / "base", out


def _bits(x):
  x = np.asarray(x)
  return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


@pytest.mark.parametrize("double_quant,dtype", CASES)
def test_dequantizes_as_bitsandbytes(checkpoints, double_quant, dtype):
  import torch
  from bitsandbytes import functional as F
  from safetensors.torch import load_file as load_torch
  directory = checkpoints[1][double_quant, dtype]
  ours = bnb.read_bnb_4bit(directory)
  assert sorted(ours) == sorted(LINEARS)
  assert all(t.nested == double_quant for t in ours.values())
  tensors = load_torch(directory / "model.safetensors")
  outs = jax.jit(lambda ts: {k: nf4.dequantize(t, jnp.dtype(dtype))
                             for k, t in ts.items()})(ours)
  for name, t in ours.items():
    state = F.QuantState.from_dict(
        {k[len(name) + 1:]: v for k, v in tensors.items()
         if k.startswith(name + ".")}, device="cpu")
    assert state.dtype == getattr(torch, dtype) and state.nested == t.nested
    expected = F.dequantize_4bit(tensors[name], state)
    assert outs[name].shape == tuple(expected.shape) == t.shape
    expected = expected.view(torch.int16 if dtype == "bfloat16"
                             else torch.int32).numpy()
    np.testing.assert_array_equal(_bits(outs[name]), _bits(expected),
                                  err_msg=name)


@pytest.mark.parametrize("double_quant,dtype", CASES)
def test_quantize_gives_the_checkpoints_bytes(checkpoints, double_quant,
                                              dtype):
  """transformers quantized the base weights (rounded to its dtype) to the
  bytes our `quantize` gives (the nested absmaxes too, where the offsets,
  float32 means in different summation orders, agree)."""
  base, directories = checkpoints
  weights = load_file(base / "model.safetensors")
  ours = bnb.read_bnb_4bit(directories[double_quant, dtype])
  for name, t in ours.items():
    w = weights[name].astype(ml_dtypes.bfloat16 if dtype == "bfloat16"
                             else np.float32)
    q = nf4.quantize(w, double_quant=double_quant)
    np.testing.assert_array_equal(q.packed, t.packed, err_msg=name)
    if q.offset == t.offset:
      np.testing.assert_array_equal(q.absmax, t.absmax, err_msg=name)


def _layout(name, t: nf4.NF4Tensor, dtype: str) -> dict:
  """`t` in the tensors bitsandbytes' `QuantState.as_dict(packed=True)`
  gives transformers to save under `name`."""
  state = {"quant_type": "nf4", "blocksize": t.blocksize, "dtype": dtype,
           "shape": list(t.shape)}
  tensors = {name: t.packed.reshape(-1, 1), f"{name}.absmax": t.absmax,
             f"{name}.quant_map": nf4.NF4_CODE}
  if t.nested:
    tensors[f"{name}.nested_absmax"] = t.nested_absmax
    tensors[f"{name}.nested_quant_map"] = t.nested_code
    state.update(nested_blocksize=t.nested_blocksize, nested_dtype="float32",
                 nested_offset=float(t.offset))
  tensors[f"{name}.quant_state.bitsandbytes__nf4"] = np.frombuffer(
      json.dumps(state).encode(), np.uint8)
  return tensors


def _specs(tensors):
  return {k: (v.dtype, v.shape) for k, v in tensors.items()}


@pytest.mark.parametrize("double_quant,dtype", CASES)
def test_the_layout_is_the_one_transformers_writes(checkpoints, double_quant,
                                                   dtype):
  """So that the refusals below are tested on files like real ones."""
  directory = checkpoints[1][double_quant, dtype]
  saved = load_file(directory / "model.safetensors")
  for name, t in bnb.read_bnb_4bit(directory).items():
    ours = _layout(name, t, dtype)
    assert _specs(ours) == _specs({k: saved[k] for k in saved
                                   if k == name or k.startswith(name + ".")})
    state = f"{name}.quant_state.bitsandbytes__nf4"
    assert json.loads(ours[state].tobytes()) == json.loads(
        saved[state].tobytes())


NAME = "model.layers.0.mlp.up_proj.weight"
STATE = NAME + ".quant_state.bitsandbytes__nf4"


def _with_state(**changes):
  def change(tensors):
    state = json.loads(tensors[STATE].tobytes())
    state.update(changes)
    tensors[STATE] = np.frombuffer(json.dumps(state).encode(), np.uint8)
  return change


def _set(key, value):
  def change(tensors):
    tensors[key] = value(tensors[key])
  return change


def _fp4(tensors):
  _with_state(quant_type="fp4")(tensors)
  tensors[NAME + ".quant_state.bitsandbytes__fp4"] = tensors.pop(STATE)


BROKEN = {
    "fp4": (_fp4, r"is quantized to bitsandbytes' 'fp4'; only 'nf4'"),
    "not_json": (_set(STATE, lambda x: x[:-3]),
                 r"bitsandbytes__nf4: is not bitsandbytes' JSON quant state"),
    "wrong_shape": (_with_state(shape=[24, 65]),
                    r"up_proj.weight: has 768 values where its quant state "
                    r"implies 780"),
    "no_shape": (_with_state(shape=None), r"has shape=None"),
    "bad_blocksize": (_with_state(blocksize=0), r"blocksize=0"),
    "fp16_nested": (_with_state(nested_dtype="float16"),
                    r"nested_dtype='float16'; only float32"),
    "missing_nested": (lambda tensors: tensors.pop(NAME + ".nested_absmax"),
                       r"nested_absmax: missing from the checkpoint"),
    "other_codes": (_set(NAME + ".quant_map", lambda x: x[::-1].copy()),
                    r"quant_map: differs from bitsandbytes' NF4 codes"),
    "int8_storage": (_set(NAME, lambda x: x.view(np.int8)),
                     r"up_proj.weight: is int8, bitsandbytes writes uint8"),
    "absmax_size": (_set(NAME + ".absmax", lambda x: x[:-1].copy()),
                    r"absmax: has 23 values where its quant state implies 24"),
}


def _write(tmp_path, tensors):
  save_file(tensors, str(tmp_path / "model.safetensors"),
            metadata={"format": "pt"})
  return tmp_path


def _nf4_file(tmp_path, change=None):
  """A checkpoint of two NF4 weights in transformers' layout."""
  rng = np.random.default_rng(0)
  tensors = {"model.embed_tokens.weight": np.zeros((8, 4), np.float32)}
  for name, double_quant in ((NAME, True),
                             ("model.layers.0.mlp.down_proj.weight", False)):
    w = rng.standard_normal((24, 64)).astype(np.float32)
    tensors.update(_layout(name, nf4.quantize(w, double_quant=double_quant),
                           "bfloat16"))
  if change:
    change(tensors)
  return _write(tmp_path, tensors)


def test_an_intact_file_reads(tmp_path):
  """The control for the refusals: unchanged, the same file reads."""
  ours = bnb.read_bnb_4bit(_nf4_file(tmp_path))
  assert sorted(ours) == ["model.layers.0.mlp.down_proj.weight", NAME]
  assert ours[NAME].nested and ours[NAME].shape == (24, 64)


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_quant_state_is_refused_in_a_line(tmp_path, case):
  change, message = BROKEN[case]
  with pytest.raises(CheckpointError, match=message) as error:
    bnb.read_bnb_4bit(_nf4_file(tmp_path, change))
  assert "\n" not in str(error.value)


def test_an_unquantized_checkpoint_is_refused(tmp_path):
  directory = _write(tmp_path, {"w": np.zeros(3, np.float32)})
  with pytest.raises(CheckpointError, match="no bitsandbytes 4-bit weights"):
    bnb.read_bnb_4bit(directory)


def test_a_4bit_checkpoint_opens_sharded_with_bitsandbytes_logits(
    checkpoints):
  """`Checkpoint.open` reads transformers' NF4 checkpoint straight into
  4-bit kernels split over fsdp=8; its logits (float32) are transformers'
  on the weights bitsandbytes dequantizes from the checkpoint. (Not those
  of its Linear4bit on the CPU, which are 2e-3 off that float32
  computation here.) Quantizing the base as it is read gives the
  checkpoint's own bytes."""
  import torch
  import transformers
  from bitsandbytes import functional as F
  from safetensors.torch import load_file as load_torch
  from longlora_jax import forward
  from longlora_jax.checkpoints.checkpoint import Checkpoint, param_shardings
  from longlora_jax.parallel.sharding import make_mesh
  base, directories = checkpoints
  mesh = make_mesh("fsdp=8")
  checkpoint = Checkpoint.open(directories[False, "float32"])
  assert checkpoint.quantized == "nf4"
  shardings = param_shardings(checkpoint.config, mesh)
  params = checkpoint.params("float32", shardings)
  q_proj = params["layers"]["self_attn"]["q_proj"]["kernel"]
  assert isinstance(q_proj, nf4.NF4Tensor) and q_proj.shape == (64, 64)
  assert q_proj.packed.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  ids = np.arange(24).reshape(2, 12) * 5 % 128
  model = transformers.LlamaForCausalLM.from_pretrained(base,
                                                        dtype=torch.float32)
  tensors = load_torch(directories[False, "float32"] / "model.safetensors")
  state = model.state_dict()
  for name in LINEARS:
    quant = F.QuantState.from_dict(
        {k[len(name) + 1:]: v for k, v in tensors.items()
         if k.startswith(name + ".")}, device="cpu")
    shape, quant.shape = quant.shape, torch.Size([quant.shape.numel()])
    # Flat: see _bnb_dequantize in tests/model/test_nf4.py.
    state[name] = F.dequantize_4bit(tensors[name], quant).reshape(shape)
  model.load_state_dict(state)
  with torch.no_grad():
    want = model(torch.from_numpy(ids)).logits.numpy()
  got = np.asarray(jax.jit(forward, static_argnums=0)(
      checkpoint.config, params, jnp.asarray(ids)))
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(
      want).max())

  read = Checkpoint.open(base).params("bfloat16", shardings, quantize="nf4")
  stored = bnb.read_bnb_4bit(directories[True, "bfloat16"])
  for name, theirs in stored.items():
    _, _, i, group, part, _ = name.split(".")
    t = read["layers"][group][part]["kernel"]
    np.testing.assert_array_equal(t.packed[int(i)], theirs.packed)
    if t.offset[int(i)] == theirs.offset:
      np.testing.assert_array_equal(t.absmax[int(i)], theirs.absmax)


@pytest.mark.parametrize("quantization,words", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True,
      "bnb_4bit_quant_type": "fp4"}, "4-bit 'fp4'"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "8-bit"),
    ({"quant_method": "gptq"}, "'gptq'")])
def test_other_quantizations_are_refused_in_a_line(tmp_path, quantization,
                                                   words):
  from longlora_jax.checkpoints.checkpoint import Checkpoint
  config = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "quantization_config": quantization}
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="--quantize nf4") as e:
    Checkpoint.open(tmp_path)
  assert words in str(e.value) and "\n" not in str(e.value)
