"""NF4 against bitsandbytes itself (CPU): the same bytes from `quantize`, the
same bits from `dequantize`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax.model import nf4

torch = pytest.importorskip("torch", reason="needs torch (bitsandbytes runs "
                            "on it)")
F = pytest.importorskip("bitsandbytes.functional",
                        reason="needs bitsandbytes (the NF4 reference)")

_BOUNDS = (nf4.NF4_CODE[:-1] + nf4.NF4_CODE[1:]) / np.float32(2)


def _ties(scale):
  """A block whose values, over its absmax `scale`, sit on the midpoints
  between NF4 codes (and on the codes, and at +-absmax)."""
  block = np.concatenate([[1.0, -1.0], _BOUNDS, nf4.NF4_CODE]) * scale
  return np.resize(block.astype(np.float32), 64)


def _inputs():
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  tiny = np.float32(2.0 ** -140)
  return {
      "normal": normal(96, 128) * 0.02,
      "not_a_multiple_of_64": normal(33, 65),  # 2145 values: 33 full blocks
      "one_short_block": normal(3, 5),  # 15 values, odd
      "63_values": normal(7, 9),
      "zeros": np.zeros((4, 64), np.float32),
      "zeros_short_last_block": np.zeros(100, np.float32),
      "one_value_per_block": np.repeat(np.float32([0.37, -2.5, 1e-3]), 64),
      "ties_and_absmax": np.concatenate([_ties(1.0), _ties(3.0),
                                         _ties(-0.1), _ties(2.0 ** -20)]),
      # Absmaxes below and around float32's 1e-38 floor of bitsandbytes,
      # subnormal values, and a block of them next to a normal one.
      "subnormal": np.concatenate([normal(64) * tiny, normal(64) * 1e-38,
                                   normal(64) * 3e-38, normal(64) * 1e-30,
                                   normal(50) * tiny]),
      "huge": normal(128) * np.float32(1e37),
      # Absmaxes near their mean (and one far off), so the nested values sit
      # in the finest part of the 8-bit map, and spread over decades.
      "absmax_near_mean": np.concatenate([
          np.eye(64, dtype=np.float32)[:1] * (1 + np.float32(1e-6) * k)
          for k in range(-150, 150, 3)] + [np.full((1, 64), 2.0, np.float32)]),
      "wide_absmax": (normal(300, 64) * np.exp(
          rng.uniform(-12, 4, (300, 1)))).astype(np.float32),
  }


INPUTS = _inputs()


def _bnb(w, double_quant):
  return F.quantize_4bit(torch.from_numpy(w.copy()), blocksize=64,
                         quant_type="nf4", compress_statistics=double_quant)


def test_code_tables_are_bitsandbytes():
  np.testing.assert_array_equal(
      nf4.NF4_CODE, F.get_4bit_type("nf4", device="cpu").numpy())
  np.testing.assert_array_equal(nf4.DYNAMIC_CODE,
                                F.create_dynamic_map().numpy())


@pytest.mark.parametrize("name", list(INPUTS))
def test_quantize_gives_bitsandbytes_bytes(name):
  w = INPUTS[name]
  packed, state = _bnb(w, double_quant=False)
  # Whole, and a block at a time (the last chunk ending the weight).
  for chunk_blocks in (nf4.CHUNK_BLOCKS, 1):
    t = nf4.quantize(w, double_quant=False, chunk_blocks=chunk_blocks)
    np.testing.assert_array_equal(t.packed, packed.numpy().reshape(-1))
    np.testing.assert_array_equal(t.absmax, state.absmax.numpy())
    assert t.shape == w.shape and not t.nested


@pytest.mark.parametrize("name", list(INPUTS))
def test_double_quant_gives_bitsandbytes_bytes_given_the_offset(name):
  """The nested bytes are bitsandbytes' `quantize_blockwise` of the
  absmaxes less our offset; the offset itself (a float32 mean) is within two
  ulps of torch's, whose summation order is the CPU's own."""
  w = INPUTS[name]
  packed, state = _bnb(w, double_quant=True)
  t = nf4.quantize(w, double_quant=True)
  np.testing.assert_array_equal(t.packed, packed.numpy().reshape(-1))
  offset = np.float32(state.offset.item())
  assert abs(t.offset - offset) <= 2 * np.spacing(offset)
  absmax = _bnb(w, double_quant=False)[1].absmax
  nested, nested_state = F.quantize_blockwise(
      absmax - torch.tensor(float(t.offset)), blocksize=256)
  np.testing.assert_array_equal(t.absmax, nested.numpy())
  np.testing.assert_array_equal(t.nested_absmax,
                                nested_state.absmax.numpy())
  np.testing.assert_array_equal(t.nested_code, nested_state.code.numpy())
  if t.offset == offset:
    np.testing.assert_array_equal(t.absmax, state.absmax.numpy())


def _bnb_dequantize(t: nf4.NF4Tensor, dtype):
  """bitsandbytes' `dequantize_4bit` of our tensor's bytes, as NumPy."""
  state2 = None
  if t.nested:
    state2 = F.QuantState(torch.from_numpy(t.nested_absmax), blocksize=256,
                          code=torch.from_numpy(t.nested_code),
                          dtype=torch.float32)
  state = F.QuantState(
      torch.from_numpy(t.absmax), shape=torch.Size(t.shape),
      code=torch.from_numpy(nf4.NF4_CODE), blocksize=t.blocksize,
      quant_type="nf4", dtype=dtype,
      offset=torch.tensor(float(t.offset)) if t.nested else None,
      state2=state2)
  # Flat: bitsandbytes' AVX-512 kernel takes the absmax of the wrong block
  # when a row is a multiple of 16 values but not of the blocksize (e.g.
  # 40 x 48); one row of n values has no such rows.
  state.shape = torch.Size([state.shape.numel()])
  packed = torch.from_numpy(np.asarray(t.packed)).reshape(-1, 1)
  out = F.dequantize_4bit(packed, state).reshape(t.shape)
  if dtype == torch.bfloat16:  # numpy has no bfloat16 of its own
    return out.view(torch.int16).numpy().view(jnp.bfloat16)
  return out.numpy()


def _bits(x):
  x = np.asarray(x)
  return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _flush_subnormals(x):
  """x with its subnormal values (below 2**-126) made zeros of their sign,
  as XLA's CPU computes them."""
  bits = _bits(x)
  sign = bits & bits.dtype.type(1 << (8 * x.dtype.itemsize - 1))
  tiny = (x != 0) & (np.abs(x.astype(np.float32)) < np.float32(2.0 ** -126))
  return np.where(tiny, sign, bits)


_DTYPES = {"float32": (jnp.float32, torch.float32),
           "bfloat16": (jnp.bfloat16, torch.bfloat16),
           "float16": (jnp.float16, torch.float16)}


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", list(_DTYPES))
def test_dequantize_is_bitsandbytes_bit_for_bit(dtype, double_quant):
  """Under jit, every input bit for bit; the subnormal one (only it has
  results below 2**-126) with those flushed to zero."""
  ours, theirs = _DTYPES[dtype]
  tensors = {name: nf4.quantize(w, double_quant=double_quant)
             for name, w in INPUTS.items()}
  outs = jax.jit(lambda ts: {name: nf4.dequantize(t, ours)
                             for name, t in ts.items()})(tensors)
  for name, t in tensors.items():
    assert outs[name].shape == t.shape and outs[name].dtype == ours, name
    expected = _bnb_dequantize(t, theirs)
    if name == "subnormal":
      expected = _flush_subnormals(expected)
    np.testing.assert_array_equal(_bits(outs[name]), _bits(expected),
                                  err_msg=name)


def test_a_stack_of_layers_scans():
  """Stacked NF4Tensors (leading layer axis on every leaf) dequantize inside
  lax.scan, each layer as bitsandbytes dequantizes it."""
  rng = np.random.default_rng(1)
  ws = [rng.standard_normal((40, 48)).astype(np.float32) for _ in range(3)]
  layers = [nf4.quantize(w) for w in ws]
  stack = jax.tree.map(lambda *xs: np.stack(xs), *layers)
  assert stack.packed.shape == (3, 960) and stack.offset.shape == (3,)

  def body(carry, layer):
    return carry, nf4.dequantize(layer, jnp.float32)
  _, out = jax.jit(lambda s: jax.lax.scan(body, 0, s))(stack)
  assert out.shape == (3, 40, 48)
  for layer, t in zip(out, layers):
    np.testing.assert_array_equal(_bits(layer),
                                  _bits(_bnb_dequantize(t, torch.float32)))
  # Dequantizing the whole stack at once is the same.
  np.testing.assert_array_equal(nf4.dequantize(stack, jnp.float32), out)


def test_quantize_holds_a_chunk_not_float32_copies_of_the_weight():
  """`quantize_host_bytes` bounds what quantizing takes beyond the weight
  (NumPy's buffers, which tracemalloc sees): a chunk of float32 work, and,
  with chunks too small to matter, the codes and the absmaxes' work."""
  import ml_dtypes
  import tracemalloc
  # bf16, 8 MiB. Quantized whole, its float32 work would be 20 bytes a
  # value (80 MiB; measured before quantize worked in chunks).
  n = 2 ** 22
  w = (np.random.default_rng(0).standard_normal(n, np.float32)
       * 0.02).astype(ml_dtypes.bfloat16)
  nf4.quantize(w[:256])  # Warm the cached 8-bit lookup table.
  peaks = {}
  for chunk_blocks in (nf4.CHUNK_BLOCKS, 16):
    tracemalloc.start()
    try:
      nf4.quantize(w, chunk_blocks=chunk_blocks)
      peaks[chunk_blocks] = tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()
  assert peaks[nf4.CHUNK_BLOCKS] <= nf4.quantize_host_bytes(n) < 40 * 2**20
  assert peaks[16] <= nf4.quantize_host_bytes(n) - 31 * 2 ** 20
