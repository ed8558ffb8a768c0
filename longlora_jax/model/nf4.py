"""NF4, QLoRA's 4-bit NormalFloat, stored exactly as bitsandbytes stores it.

A tensor of n values is cut, in row-major order, into blocks of `blocksize`
(64) values, the last one possibly shorter. Each block keeps its absolute
maximum (absmax) and each value the index of the nearest of the 16 NF4 codes
to value / absmax. Two indices share a byte, the first in the high nibble; an
odd n is padded with the index of 0.0. With double quantization ("nested",
bitsandbytes' `compress_statistics`) the absmaxes lose their mean (`offset`)
and are themselves quantized, 8 bits each, to bitsandbytes' dynamic 8-bit map
in blocks of 256, each with its own float32 absmax.

`quantize` runs once, in NumPy, where weights are loaded; `dequantize` is
jax.numpy and runs inside `jax.jit` (the scanned layer calls it). Both follow
bitsandbytes 0.50 on the CPU (`quantize_4bit`, `dequantize_4bit`) bit for bit,
but for these (the first two pinned down by tests/model/test_nf4.py):

- the offset is the absmaxes' float64 mean rounded to float32, where
  bitsandbytes takes torch's float32 mean, whose summation order is the
  CPU's own; for small tensors the two can differ by an ulp or two. Given
  the same offset, the nested bytes are the same.
- XLA on the CPU flushes subnormal floats to zero, so a value whose
  dequantized magnitude is below 2**-126 comes back as a zero of its sign.
- bitsandbytes' 8-bit quantizer has NEON code of its own on ARM CPUs; this
  follows its x86 build, the one compared.

Checkpoints quantized elsewhere (on GPUs) are read as they are
(checkpoints/bnb.py): dequantizing needs only the stored blocks.
"""

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

# The 16 NF4 codes, the float32 table of bitsandbytes (`get_4bit_type("nf4")`,
# QLoRA's quantiles of N(0, 1) scaled to [-1, 1]).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)

# The positive values of bitsandbytes' dynamic 8-bit map below 1.0, as
# `create_dynamic_map()` computes them in float32: for k = 0..6, the 2**k
# midpoints of linspace(0.1, 1, 2**k + 1) times 10**(k - 6). The map is these,
# their negatives, 0 and 1, sorted. Kept as values, not recomputed, because
# torch.linspace's last bits are its own.
_DYNAMIC_POSITIVE = np.array("""
    5.5000004e-07 3.2500002e-06 7.75e-06 2.1249998e-05 4.375e-05 6.625e-05
    8.875e-05 0.00015625001 0.00026875004 0.00038125002 0.00049375003
    0.0006062501 0.00071875006 0.00083125 0.0009437501 0.0012812499 0.00184375
    0.00240625 0.00296875 0.0035312497 0.00409375 0.0046562497 0.0052187503
    0.00578125 0.00634375 0.00690625 0.00746875 0.00803125 0.00859375
    0.009156249 0.00971875 0.01140625 0.01421875 0.01703125 0.019843752
    0.02265625 0.02546875 0.028281251 0.03109375 0.03390625 0.036718752
    0.03953125 0.042343747 0.04515625 0.04796875 0.05078125 0.05359375
    0.05640625 0.059218753 0.06203125 0.06484375 0.067656256 0.070468746
    0.07328125 0.07609375 0.07890625 0.08171876 0.08453125 0.08734375
    0.09015625 0.092968754 0.09578126 0.09859375 0.107031256 0.12109375
    0.13515624 0.14921875 0.16328125 0.17734376 0.19140625 0.20546874
    0.21953125 0.23359375 0.24765624 0.26171875 0.27578127 0.28984374
    0.30390626 0.31796873 0.33203125 0.34609374 0.36015624 0.37421876
    0.38828123 0.40234375 0.41640624 0.43046874 0.44453126 0.45859373
    0.47265625 0.4867187 0.50078124 0.5148437 0.5289062 0.54296875 0.5570313
    0.5710938 0.58515626 0.5992187 0.61328125 0.6273438 0.6414063 0.65546876
    0.6695312 0.68359375 0.6976563 0.7117188 0.72578126 0.7398437 0.75390625
    0.7679688 0.78203124 0.79609376 0.8101562 0.82421875 0.8382813 0.85234374
    0.86640626 0.8804687 0.89453125 0.9085938 0.92265624 0.93671876 0.9507812
    0.96484375 0.9789063 0.99296874""".split(), np.float32)
DYNAMIC_CODE = np.concatenate([-_DYNAMIC_POSITIVE[::-1], [0.0],
                               _DYNAMIC_POSITIVE, [1.0]]).astype(np.float32)

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
# Blocks `quantize` works on at a time (1M values): its float32 work, a few
# copies of the chunk and int64 indices, stays near 32 MiB whatever the
# weight's size.
CHUNK_BLOCKS = 2 ** 14
_F32 = np.float32


@flax.struct.dataclass
class NF4Tensor:
  """A weight in NF4, a pytree: stacks of them (leading axes on every leaf)
  scan like any parameter.

  packed: uint8 [..., ceil(n / 2)], two codes a byte, the first in the high
    nibble (n = prod(shape)).
  absmax: float32 [..., blocks], or uint8 [..., blocks] codes into
    `nested_code` when nested (blocks = ceil(n / blocksize)).
  nested_absmax: float32 [..., ceil(blocks / nested_blocksize)] or None.
  nested_code: float32 [..., 256], the 8-bit map the absmaxes were quantized
    to (a checkpoint's own, kept as it is), or None.
  offset: float32 [...], the mean the nested absmaxes lost, or None.
  shape: the weight's shape (a checkpoint's: torch's [out, in]).
  """
  packed: Any
  absmax: Any
  nested_absmax: Any = None
  nested_code: Any = None
  offset: Any = None
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
  blocksize: int = flax.struct.field(pytree_node=False, default=BLOCKSIZE)
  nested_blocksize: int = flax.struct.field(pytree_node=False,
                                            default=NESTED_BLOCKSIZE)

  @property
  def nested(self) -> bool:
    return self.offset is not None

  @property
  def kernel_shape(self) -> tuple[int, ...]:
    """The shape of the `[..., in, out]` kernel this weight stands for: its
    leading (layer) axes, then `shape` reversed."""
    return (*self.packed.shape[:-1], *self.shape[::-1])


def _blocks(flat: np.ndarray, blocksize: int) -> np.ndarray:
  """flat [n] -> [ceil(n / blocksize), blocksize], the last row padded with
  zeros."""
  rows = -(-flat.size // blocksize)
  out = np.zeros(rows * blocksize, flat.dtype)
  out[:flat.size] = flat
  return out.reshape(rows, blocksize)


def _scaled(flat: np.ndarray, blocksize: int):
  """(value / absmax clipped to [-1, 1], absmax) as bitsandbytes' CPU
  `quantize_4bit` computes them: a full block multiplies by 1 / absmax,
  with absmax raised to 1e-38 if below (zero, subnormal) but stored as it
  is; a short last block divides by its absmax, raised and stored so."""
  full = flat.size - flat.size % blocksize
  head = flat[:full].reshape(-1, blocksize)
  absmax = np.abs(head).max(axis=1, initial=_F32(0))
  scaled = head * (_F32(1) / np.maximum(absmax, _F32(1e-38)))[:, None]
  parts, maxes = [scaled.reshape(-1)], [absmax]
  if full < flat.size:
    tail = flat[full:]
    last = np.maximum(np.abs(tail).max(), _F32(1e-38))
    parts.append(tail / last)
    maxes.append(np.array([last], _F32))
  return np.clip(np.concatenate(parts), -1, 1), np.concatenate(maxes)


@functools.cache
def _dynamic_lut(code_bytes: bytes) -> np.ndarray:
  """bitsandbytes' x86 CPU 8-bit quantizer looks a code up in a table of
  65536 evenly spaced values in [-1, 1], each mapped to the number of
  midpoints of the (sorted) code below it."""
  code = np.frombuffer(code_bytes, _F32)
  midpoints = (code[:-1] + code[1:]) * _F32(0.5)
  grid = (_F32(2) * np.arange(65536, dtype=_F32)) / _F32(65535) - _F32(1)
  return np.searchsorted(midpoints, grid, side="left").astype(np.uint8)


def _quantize_dynamic(x: np.ndarray, blocksize: int, code: np.ndarray):
  """x float32 [n] -> (uint8 [n] codes, float32 absmax per block), as
  bitsandbytes' CPU `quantize_blockwise` (the nested absmaxes)."""
  rows = _blocks(x, blocksize)
  absmax = np.abs(rows).max(axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    scaled = np.clip(rows * (_F32(1) / absmax)[:, None], _F32(-1), _F32(1))
  # Its index is trunc(fma((s + 1) / 2, 65535, 0.5)): the float64 product
  # and sum are exact, then one rounding to float32, as the FMA does.
  half = (scaled + _F32(1)) * _F32(0.5)
  index = (half.astype(np.float64) * 65535 + 0.5).astype(_F32)
  codes = _dynamic_lut(code.tobytes())[
      np.nan_to_num(index).astype(np.int64)]
  codes[absmax == 0] = 0  # an all-zero block stores code 0 and absmax 0
  return codes.reshape(-1)[:x.size], absmax


def quantize(w, blocksize: int = BLOCKSIZE, double_quant: bool = True,
             chunk_blocks: int = CHUNK_BLOCKS) -> NF4Tensor:
  """NF4 of `w` (a float array, taken as float32, as bitsandbytes computes),
  as bitsandbytes' `quantize_4bit(w, quant_type="nf4", blocksize=blocksize,
  compress_statistics=double_quant)` on the CPU.

  Blocks are independent, so `chunk_blocks` of them at a time are taken to
  float32 and coded: beyond `w` the host holds the result and one chunk's
  work (`quantize_host_bytes`), not float32 copies of a whole layer's
  weight (a 70B MLP matrix is 235M values)."""
  w = np.asarray(w)
  if w.dtype.kind in "biuc":
    raise TypeError(f"NF4 quantizes floats, got {w.dtype}")
  flat = w.reshape(-1)
  if flat.size == 0:
    raise ValueError("NF4 of an empty tensor")
  # torch.bucketize: the first code whose upper midpoint is >= the value,
  # so a value on a midpoint takes the lower code.
  bounds = (NF4_CODE[:-1] + NF4_CODE[1:]) / _F32(2)
  step = math.lcm(chunk_blocks * blocksize, 2)  # a byte's codes in a chunk
  packed = np.empty(-(-flat.size // 2), np.uint8)
  absmax = np.empty(-(-flat.size // blocksize), _F32)
  for start in range(0, flat.size, step):
    scaled, part_absmax = _scaled(flat[start:start + step].astype(_F32),
                                  blocksize)
    absmax[start // blocksize:][:part_absmax.size] = part_absmax
    codes = np.searchsorted(bounds, _blocks(scaled, 2).reshape(-1),
                            side="left").astype(np.uint8).reshape(-1, 2)
    packed[start // 2:][:codes.shape[0]] = (codes[:, 0] << 4) | codes[:, 1]
  if not double_quant:
    return NF4Tensor(packed, absmax, shape=tuple(w.shape), blocksize=blocksize)
  offset = _F32(absmax.astype(np.float64).mean())
  nested, nested_absmax = _quantize_dynamic(absmax - offset, NESTED_BLOCKSIZE,
                                            DYNAMIC_CODE)
  return NF4Tensor(packed, nested, nested_absmax, DYNAMIC_CODE.copy(),
                   np.asarray(offset), tuple(w.shape), blocksize,
                   NESTED_BLOCKSIZE)


def quantize_host_bytes(n: int) -> int:
  """A bound on the host memory `quantize` takes for a weight of `n` values
  beyond the weight itself (default blocks, double quantization): its codes
  (n / 2 bytes), and the larger of one chunk's work (22 MB measured with
  tracemalloc, bounded by 32 MiB) and the absmaxes' (36 bytes a block
  measured, in float32 and float64 while quantizing them), bounded by
  their sum."""
  return -(-n // 2) + 40 * -(-n // BLOCKSIZE) + 32 * 2**20


def _per_block(values, scale, blocksize: int):
  """values [..., n] times scale [..., ceil(n / blocksize)], each scale over
  its block of values (the last one possibly short), in float32."""
  n, blocks = values.shape[-1], scale.shape[-1]
  lead = values.shape[:-1]
  values = jnp.pad(values, [(0, 0)] * len(lead) + [(0, blocks * blocksize - n)])
  values = values.reshape(*lead, blocks, blocksize) * scale[..., None]
  return values.reshape(*lead, blocks * blocksize)[..., :n]


def _absmax(t: NF4Tensor):
  """The float32 absmax of each block [..., blocks]: as stored, or undone
  from its nested 8 bits as bitsandbytes does (code * absmax, then + offset,
  each rounded to float32)."""
  if not t.nested:
    return jnp.asarray(t.absmax, jnp.float32)
  code = jnp.take_along_axis(jnp.asarray(t.nested_code),
                             jnp.asarray(t.absmax, jnp.int32), axis=-1)
  product = _per_block(code, jnp.asarray(t.nested_absmax), t.nested_blocksize)
  # XLA fuses a multiply feeding an add into one FMA, rounding once where
  # bitsandbytes rounds twice. Passing the product's bits through an integer
  # op it cannot see through (xor with 0; with 1 for a NaN) keeps the
  # product rounded on its own.
  bits = jax.lax.bitcast_convert_type(product, jnp.uint32)
  bits = bits ^ jnp.isnan(product).astype(jnp.uint32)
  product = jax.lax.bitcast_convert_type(bits, jnp.float32)
  return product + jnp.asarray(t.offset)[..., None]


def dequantize(t: NF4Tensor, dtype=jnp.bfloat16):
  """The weight [..., *t.shape] in `dtype`: code * absmax in float32, then
  rounded to `dtype`, as bitsandbytes' `dequantize_4bit`. Works under jit
  and on stacks (leading axes)."""
  lead = t.packed.shape[:-1]
  n = math.prod(t.shape)
  packed = jnp.asarray(t.packed)
  codes = jnp.stack([packed >> 4, packed & 15], axis=-1)
  codes = codes.reshape(*lead, -1)[..., :n]
  values = jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)]
  values = _per_block(values, _absmax(t), t.blocksize)
  return values.astype(dtype).reshape(*lead, *t.shape)


def quantize_kernel(kernel_DF, double_quant: bool = True) -> NF4Tensor:
  """NF4 of our kernel `[..., in, out]` (a stack of layers or one), each
  leading index quantized alone as the torch weight `[out, in]` it is, as
  bitsandbytes quantizes a checkpoint's linear layers. A
  `jax.ShapeDtypeStruct` gives the abstract NF4Tensor (for plans)."""
  *lead, d, f = kernel_DF.shape
  if isinstance(kernel_DF, jax.ShapeDtypeStruct):
    return abstract((*lead, d, f), double_quant)
  w = np.asarray(kernel_DF).reshape(-1, d, f)
  layers = [quantize(np.swapaxes(x, 0, 1), double_quant=double_quant)
            for x in w]
  return jax.tree.map(lambda *xs: np.stack(xs).reshape(*lead, *xs[0].shape),
                      *layers)


def abstract(kernel_shape, double_quant: bool = True) -> NF4Tensor:
  """The NF4Tensor of a `[..., in, out]` kernel as ShapeDtypeStructs."""
  *lead, d, f = kernel_shape
  n = d * f
  blocks = -(-n // BLOCKSIZE)
  sds = lambda *shape, dtype=np.float32: jax.ShapeDtypeStruct(
      (*lead, *shape), dtype)
  if not double_quant:
    return NF4Tensor(sds(-(-n // 2), dtype=np.uint8), sds(blocks),
                     shape=(f, d))
  return NF4Tensor(sds(-(-n // 2), dtype=np.uint8),
                   sds(blocks, dtype=np.uint8),
                   sds(-(-blocks // NESTED_BLOCKSIZE)), sds(256), sds(),
                   (f, d))


def quantize_layers(params, double_quant: bool = True):
  """`params` with every layer kernel (the attention and MLP projections,
  `layers/.../kernel`) in NF4 (`quantize_kernel`); embeddings, norms,
  biases and the LM head as they are."""
  def leaf(path, x):
    names = [getattr(k, "key", None) for k in path]
    if names[0] == "layers" and names[-1] == "kernel":
      return quantize_kernel(x, double_quant)
    return x
  return jax.tree_util.tree_map_with_path(leaf, params)
