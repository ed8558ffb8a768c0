"""Grouped causal attention by the fused Pallas kernels (S²-Attn, full
attention): interpret mode on CPU against the pure-JAX S²-Attn and the float64
reference, the CUDA (Triton) lowering at Llama-2 7B shapes, and XLA:GPU's
compile of the kernels to A100 and H100 PTX, all without a GPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax.perf import gpu_target
from longlora_jax.attention.dense import dense_causal_attention
from longlora_jax.attention.pallas import grouped
from longlora_jax.attention.pallas.grouped import (BlockConfig,
                                                   pallas_causal_attention,
                                                   pallas_s2_attention)
from longlora_jax.attention.dispatch import s2_attention
from tests.references import attention as ref

pytestmark = pytest.mark.skipif(not grouped.AVAILABLE,
                                reason="Pallas Triton not importable")


def _config(block_q, block_k):
  """Forward and dQ tiles (block_q, block_k); dK/dV tiles swapped, so every
  kernel sees both orders of unequal blocks."""
  return BlockConfig(block_q=block_q, block_k=block_k, block_q_dkv=block_k,
                     block_k_dkv=block_q, block_q_dq=block_q,
                     block_k_dq=block_k)


# batch, seq, q_heads, kv_heads, head_dim, group, tiles
CASES = {
    # G larger than the blocks, MHA.
    "mha_g64_b32x16": (1, 128, 4, 4, 64, 64, _config(32, 16)),
    # G smaller than the blocks: several groups per tile; GQA 8 on 2.
    "gqa_g16_b32": (2, 128, 8, 2, 64, 16, _config(32, 32)),
    # G equal to the query block, head_dim 128, GQA 8 on 2.
    "gqa_d128_g64_b64x32": (1, 256, 8, 2, 128, 64, _config(64, 32)),
    # G/2 = 48 not a multiple of the blocks: tiles cross group borders; one
    # kv head serves both halves.
    "shared_kv_g96_b32x16": (1, 192, 4, 1, 64, 96, _config(32, 16)),
    # G = seq (the shifted heads still shift), default tiles clamped to seq.
    "g_eq_seq_default": (1, 128, 4, 2, 64, 128, None),
    # seq not a multiple of the blocks (as 100,000 is not): padded to 224;
    # G/2 = 25 crosses tiles.
    "padded_g50_b32x16": (1, 200, 4, 2, 64, 50, _config(32, 16)),
    # Shorter than the default tiles and not a power of two: padded to 128.
    "padded_short_default": (2, 96, 4, 4, 64, 24, None),
    # Odd and uneven head counts (the last floor(N/2) heads shift): 9 on 3
    # (SmolLM2-135M), 14 on 2, 7 on 7.
    "odd_9_on_3": (1, 64, 9, 3, 64, 16, _config(16, 16)),
    "uneven_14_on_2": (1, 64, 14, 2, 64, 32, _config(32, 16)),
    "odd_7_mha": (1, 64, 7, 7, 64, 64, _config(16, 32)),
}


def _inputs(batch, seq, q_heads, kv_heads, head_dim, dtype, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(x, dtype) for x in ref.random_qkv(
      rng, batch, seq, q_heads, kv_heads, head_dim))
  w = jnp.asarray(rng.standard_normal((batch, seq, q_heads, head_dim)),
                  jnp.float32)
  return q, k, v, w


def _s2_reference(q, k, v, w, group, variant):
  B, T, N, _ = q.shape
  keys = ref.s2_head_keys(T, group, N, variant)
  return ref.attention(q.astype(jnp.float32), k.astype(jnp.float32),
                       v.astype(jnp.float32), ref.mask_from_keys(keys, None, B),
                       w)


F32 = dict(out=dict(atol=1e-5), grads=dict(atol=1e-4))
BF16 = dict(out=dict(relative=2e-2), grads=dict(relative=2e-2))


def _assert_all_close(got, want, tolerances):
  """Output and (dq, dk, dv) within `tolerances` (F32 or BF16)."""
  (out, grads), (want_out, want_grads) = got, want
  ref.assert_close(out, want_out, **tolerances["out"])
  for g, want_g in zip(grads, want_grads):
    assert g.dtype == out.dtype
    ref.assert_close(g, want_g, **tolerances["grads"])


@pytest.mark.parametrize("variant", ["flash", "roll"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_dense_and_reference_float32(case, variant):
  B, T, N, K, H, G, config = CASES[case]
  q, k, v, w = _inputs(B, T, N, K, H, jnp.float32)
  got = ref.value_and_grads(
      pallas_s2_attention, (("group_size", G), ("variant", variant),
                            ("config", config), ("interpret", True)),
      q, k, v, w)
  dense = ref.value_and_grads(
      s2_attention, (("group_size", G), ("variant", variant),
                     ("implementation", "dense")), q, k, v, w)
  _assert_all_close(got, dense, F32)
  _assert_all_close(got, _s2_reference(q, k, v, w, G, variant), F32)


@pytest.mark.parametrize("variant", ["flash", "roll"])
@pytest.mark.parametrize("case", ["gqa_d128_g64_b64x32",
                                  "shared_kv_g96_b32x16"])
def test_matches_dense_and_reference_bfloat16(case, variant):
  B, T, N, K, H, G, config = CASES[case]
  q, k, v, w = _inputs(B, T, N, K, H, jnp.bfloat16, seed=1)
  got = ref.value_and_grads(
      pallas_s2_attention, (("group_size", G), ("variant", variant),
                            ("config", config), ("interpret", True)),
      q, k, v, w)
  assert got[0].dtype == jnp.bfloat16
  dense = ref.value_and_grads(
      s2_attention, (("group_size", G), ("variant", variant),
                     ("implementation", "dense")), q, k, v, w)
  _assert_all_close(got, dense, BF16)
  _assert_all_close(got, _s2_reference(q, k, v, w, G, variant), BF16)


@pytest.mark.parametrize("shape", [(1, 128, 4, 4, 64), (2, 128, 6, 2, 128)],
                         ids=str)
def test_causal_entry_is_plain_causal_attention(shape):
  q, k, v, w = _inputs(*shape, jnp.float32, seed=2)
  got = ref.value_and_grads(
      pallas_causal_attention, (("config", _config(32, 16)),
                                ("interpret", True)), q, k, v, w)
  want = ref.value_and_grads(dense_causal_attention, (), q, k, v, w)
  _assert_all_close(got, want, F32)


def test_s2_attention_dispatches_to_the_kernel():
  q, k, v, _ = _inputs(1, 128, 4, 2, 64, jnp.float32, seed=3)
  got = s2_attention(q, k, v, group_size=32, variant="roll",
                     implementation="pallas_interpret")
  want = pallas_s2_attention(q, k, v, group_size=32, variant="roll",
                             interpret=True)
  np.testing.assert_array_equal(got, want)
  ref.assert_close(got, s2_attention(q, k, v, group_size=32, variant="roll",
                                     implementation="dense"), atol=1e-5)


@pytest.mark.parametrize("kwargs,shapes,message", [
    (dict(), ((1, 64, 4, 32), (1, 64, 4, 32)), "head_dim in (64, 128); got 32"),
    (dict(config=BlockConfig(block_q=24)), ((1, 96, 4, 64), (1, 96, 4, 64)),
     "block_q=24 must be a power of two"),
    (dict(config=BlockConfig(block_k=8)), ((1, 64, 4, 64), (1, 64, 4, 64)),
     "block_k=8 must be a power of two >= 16"),
    (dict(), ((1, 64, 6, 64), (1, 64, 4, 64)),
     "q_heads=6 is not a multiple of kv_heads=4"),
    (dict(group_size=24), ((1, 64, 4, 64), (1, 64, 4, 64)),
     "seq=64, group_size=24"),
    (dict(variant="shift"), ((1, 64, 4, 64), (1, 64, 4, 64)),
     "unknown S²-Attn variant 'shift'"),
    (dict(segment_ids_BT=jnp.zeros((1, 64), jnp.int32)),
     ((1, 64, 4, 64), (1, 64, 4, 64)), "do not support segment_ids_BT"),
])
def test_value_errors(kwargs, shapes, message):
  q, k = jnp.zeros(shapes[0]), jnp.zeros(shapes[1])
  with pytest.raises(ValueError, match=re.escape(message)):
    pallas_s2_attention(q, k, k, interpret=True, **kwargs)


def test_value_errors_causal_and_dtype():
  q = jnp.zeros((1, 64, 4, 64))
  with pytest.raises(ValueError, match="do not support segment_ids_BT"):
    pallas_causal_attention(q, q, q, segment_ids_BT=jnp.zeros((1, 64)))
  with pytest.raises(ValueError, match="one dtype"):
    pallas_causal_attention(q, q.astype(jnp.bfloat16), q)
  with pytest.raises(ValueError, match="do not support segment_ids_BT"):
    s2_attention(q, q, q, implementation="pallas",
                 segment_ids_BT=jnp.zeros((1, 64), jnp.int32))


# CUDA lowering on a CPU-only machine: Pallas -> Triton IR in a custom call.
# jax >= 0.11 reads the GPU's kind from the context mesh's abstract device
# (else from the default device, here the CPU): under an abstract mesh of
# one H100 it lowers with no GPU and no CUDA plugin; jax 0.10 assumed sm_90.

LLAMA_7B = jax.ShapeDtypeStruct((1, 8192, 32, 128), jnp.bfloat16)
_COPIES = re.compile(r"stablehlo\.(concatenate|pad|slice|dynamic_slice|"
                     r"gather|reverse)\b")
_H100 = jax.sharding.AbstractMesh(
    (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"))


def _lower_for_cuda(fn, *args):
  with jax.sharding.use_abstract_mesh(_H100):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def _triton_calls(lowered):
  text = lowered.as_text()
  # The kernels read q, k, v in place: nothing is sliced, padded, rolled or
  # concatenated; the only transpose is D = rowsum(dO * O), [batch, heads,
  # seq] float32.
  assert not _COPIES.search(text)
  for shape in re.findall(r"stablehlo\.transpose.*-> tensor<([^>]*)>", text):
    assert shape.count("x") == 3, shape
  return re.findall(r"name = \"(grouped_attention_\w+)\"", text)


@pytest.mark.parametrize("variant", ["flash", "roll"])
def test_lowers_for_cuda_at_llama_7b_shapes(variant):
  attention = lambda q, k, v: pallas_s2_attention(
      q, k, v, group_size=2048, variant=variant)
  forward = _lower_for_cuda(attention, LLAMA_7B, LLAMA_7B, LLAMA_7B)
  assert _triton_calls(forward) == ["grouped_attention_forward"]
  grads = jax.grad(
      lambda q, k, v: attention(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))
  both = _lower_for_cuda(grads, LLAMA_7B, LLAMA_7B, LLAMA_7B)
  assert sorted(_triton_calls(both)) == [
      "grouped_attention_dkv", "grouped_attention_dq",
      "grouped_attention_forward"]


def test_causal_and_gqa_lower_for_cuda():
  kv = jax.ShapeDtypeStruct((1, 4096, 8, 128), jnp.bfloat16)
  q = jax.ShapeDtypeStruct((1, 4096, 32, 128), jnp.bfloat16)
  for attention in (pallas_causal_attention, lambda q, k, v: (
      pallas_s2_attention(q, k, v, group_size=1024, variant="roll"))):
    grads = jax.grad(lambda q, k, v: attention(q, k, v).astype(
        jnp.float32).sum(), (0, 1, 2))
    assert len(_triton_calls(_lower_for_cuda(grads, q, kv, kv))) == 3


# Beyond lowering: XLA:GPU compiles the Triton kernels to PTX for a named GPU
# (compile-only devices from JAX's CUDA plugin; no GPU), which checks tiles
# against that GPU's shared memory and generates its tensor-core code.

def _compile_for(target, fn, shapes, dump_dir):
  if not gpu_target.AVAILABLE:
    pytest.skip("needs jax[cuda12-local] (requirements-test.txt)")
  devices = gpu_target.devices(target, 1)
  device = jax.sharding.SingleDeviceSharding(devices[0])
  args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device)
          for s in shapes]
  return gpu_target.compile_to_ptx(fn, args, devices, dump_dir)[1]


@pytest.mark.parametrize("target, arch, mma", [
    ("a100", "sm_80", "mma.sync"), ("h100", "sm_90a", "wgmma.mma_async")])
def test_kernels_compile_to_ptx_for_the_gpu(target, arch, mma, tmp_path):
  grads = jax.grad(lambda q, k, v: pallas_s2_attention(
      q, k, v, group_size=2048).astype(jnp.float32).sum(), (0, 1, 2))
  kernels = _compile_for(target, grads, [LLAMA_7B] * 3, tmp_path)
  names = ["grouped_attention_forward", "grouped_attention_dq",
           "grouped_attention_dkv"]
  assert set(names) <= set(kernels)
  for name in names:
    assert re.search(rf"^\.target {arch}\b", kernels[name], re.M)
    assert mma in kernels[name]  # tensor cores (Hopper: warpgroup MMA)


def test_tiles_too_big_for_the_gpu_fail_to_compile(tmp_path):
  # 256 x 256 tiles of head_dim 128 in 4 stages need 448 KiB of shared memory;
  # an A100 has 163 KiB per block.
  config = BlockConfig(block_q=256, block_k=256, num_warps=8, num_stages=4)
  with pytest.raises(Exception, match="Shared memory size limit exceeded"):
    _compile_for("a100", lambda q, k, v: pallas_s2_attention(
        q, k, v, group_size=2048, config=config), [LLAMA_7B] * 3, tmp_path)


def test_float32_defaults_fit_an_a100(tmp_path):
  # At head_dim 128 three forward stages of float32 tiles need 196,608
  # bytes, and at "highest" precision (the tests' default) two backward
  # stages 180,224; the defaults take fewer.
  q = jax.ShapeDtypeStruct(LLAMA_7B.shape, jnp.float32)
  grads = jax.grad(lambda q, k, v: pallas_s2_attention(
      q, k, v, group_size=2048).sum(), (0, 1, 2))
  kernels = _compile_for("a100", grads, [q] * 3, tmp_path)
  assert {"grouped_attention_forward", "grouped_attention_dq",
          "grouped_attention_dkv"} <= set(kernels)


def test_soft_cap_inside_the_kernels():
  # Gemma 2's cap, small enough to bite, in the forward and both backward
  # kernels (the interpreter): S²-Attn and causal entries against the
  # float64 reference and the dense path with the same cap.
  B, T, N, K, H, G, config = CASES["shared_kv_g96_b32x16"]
  q, k, v, w = _inputs(B, T, N, K, H, jnp.float32, seed=3)
  cap = 2.0
  keys = ref.s2_head_keys(T, G, N, "flash")
  want = ref.attention(q, k, v, ref.mask_from_keys(keys, None, B), w,
                       softcap=cap)
  assert np.abs(want[0] - _s2_reference(q, k, v, w, G, "flash")[0]).max() > .1
  got = ref.value_and_grads(
      pallas_s2_attention, (("group_size", G), ("config", config),
                            ("interpret", True), ("softcap", cap)), q, k, v, w)
  _assert_all_close(got, want, F32)
  causal = ref.value_and_grads(
      pallas_causal_attention, (("config", config), ("interpret", True),
                                ("softcap", cap)), q, k, v, w)
  dense = ref.value_and_grads(dense_causal_attention, (("softcap", cap),),
                              q, k, v, w)
  _assert_all_close(causal, dense, F32)
