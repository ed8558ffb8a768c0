"""Grouped causal attention on cuDNN (S²-Attn, full attention): the
grouping against the float64 reference (through jax.nn.dot_product_attention's
XLA path, which runs anywhere), and the cuDNN path compiled by XLA:GPU for an
H100 that is not here."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax.perf import gpu_target
from longlora_jax.attention.cudnn_grouped import (cudnn_causal_attention,
                                                cudnn_s2_attention)
from tests.references import attention as ref

# batch, seq, q_heads, kv_heads, group, head_dim
SHAPES = [
    (1, 16, 4, 4, 4, 8),     # MHA, seq / 4
    (2, 32, 8, 2, 16, 16),   # GQA, kv heads split between the halves
    (1, 16, 4, 1, 16, 8),    # one kv head shared by both halves; G = seq
    (3, 24, 6, 3, 6, 128),   # odd kv heads (middle one shared), odd shift
    (1, 32, 2, 2, 8, 64),    # one head per half
    (1, 16, 9, 3, 4, 8),     # odd heads: SmolLM2-135M's 9 on 3
    (2, 24, 14, 2, 8, 8),    # 14 on 2
    (1, 16, 7, 7, 16, 8),    # 7 heads, MHA
]


@pytest.mark.parametrize("variant", ["flash", "roll"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_float32(shape, variant):
  B, T, N, K, G, H = shape
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(x, jnp.float32)
             for x in ref.random_qkv(rng, B, T, N, K, H))
  w = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  options = (("group_size", G), ("variant", variant),
             ("implementation", "xla"))
  out, grads = ref.value_and_grads(cudnn_s2_attention, options, q, k, v, w)
  keys = ref.s2_head_keys(T, G, N, variant)
  want, want_grads = ref.attention(q, k, v, ref.mask_from_keys(keys, None, B),
                                   w)
  ref.assert_close(out, want, atol=1e-5)
  for got_g, want_g in zip(grads, want_grads):
    ref.assert_close(got_g, want_g, atol=1e-4)


def test_keeps_the_dtype_and_refuses_segments():
  q = jnp.zeros((1, 16, 4, 8), jnp.bfloat16)
  out = cudnn_s2_attention(q, q, q, implementation="xla")
  assert out.dtype == jnp.bfloat16 and out.shape == q.shape
  with pytest.raises(ValueError, match="use the 'dense' or 'chunked'"):
    cudnn_s2_attention(q, q, q, segment_ids_BT=jnp.zeros((1, 16), jnp.int32))
  with pytest.raises(ValueError, match="q_heads=4 is not a multiple of "
                                       "kv_heads=3"):
    cudnn_s2_attention(q, q[:, :, :3], q[:, :, :3], implementation="xla")


FORWARD, BACKWARD = "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"
# HBM data movement besides the cuDNN calls.
_MOVES = re.compile(
    r"^\s*(?:ROOT )?%\S+ = \S+ (fusion|copy|transpose|concatenate|pad|slice|"
    r"dynamic-slice|dynamic-update-slice|gather|scatter)\(", re.M)


@pytest.fixture(scope="module")
def h100():
  if not gpu_target.AVAILABLE:
    pytest.skip("needs JAX's CUDA plugin (requirements-test.txt)")
  with gpu_target.assume_cudnn():
    yield jax.sharding.SingleDeviceSharding(gpu_target.devices("h100", 1)[0])


def _compile(fn, shapes, sharding, dtype=jnp.bfloat16):
  args = [jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for s in shapes]
  return jax.jit(fn).trace(*args).lower().compile()


def _score_buffers(hlo, sizes):
  """Buffers with two axes among `sizes` (T, G, G/2): score matrices."""
  found = []
  for dtype, dims in re.findall(r"\b(f32|bf16|f16|pred)\[([0-9,]+)\]", hlo):
    if sum(int(d) in sizes for d in dims.split(",")) >= 2:
      found.append(f"{dtype}[{dims}]")
  return found


@pytest.mark.parametrize("variant", ["flash", "roll"])
@pytest.mark.parametrize("heads", [(32, 32), (32, 8), (32, 1)], ids=str)
def test_compiles_to_cudnn_flash_attention_for_h100(h100, heads, variant):
  (N, K), (B, T, H) = heads, (1, 8192, 128)
  G = T // 4
  q, kv = (B, T, N, H), (B, T, K, H)
  attention = lambda q, k, v: cudnn_s2_attention(q, k, v, group_size=G,
                                                 variant=variant)
  calls = {"flash": 2, "roll": 1}[variant]
  hlo = _compile(attention, [q, kv, kv], h100).as_text()
  assert re.findall(r'custom_call_target="([^"]+)"', hlo) == [FORWARD] * calls
  assert not _score_buffers(hlo, {T, G, G // 2})
  # q, k, v written once into the call layout and the output once back
  # ("flash": three more small fusions for the half groups); no standalone
  # copy or transpose.
  moves = _MOVES.findall(hlo[hlo.index("\nENTRY"):])
  assert set(moves) == {"fusion"}
  assert len(moves) == {"flash": 7, "roll": 4}[variant]

  def grads(q, k, v, ct):
    return jax.vjp(attention, q, k, v)[1](ct)
  both = _compile(grads, [q, kv, kv, q], h100)
  hlo = both.as_text()
  assert sorted(re.findall(r'custom_call_target="([^"]+)"', hlo)) == sorted(
      [FORWARD, BACKWARD] * calls)
  assert not _score_buffers(hlo, {T, G, G // 2})
  assert both.memory_analysis().temp_size_in_bytes < 8 * B * T * N * H * 2


def test_xla_attention_does_hold_scores(h100):
  # The check above can fail: the XLA path of the same grouping keeps
  # [groups, heads, G, G] scores in HBM.
  T, G = 8192, 2048
  attention = lambda q, k, v: cudnn_s2_attention(q, k, v, group_size=G,
                                                 implementation="xla")
  hlo = _compile(attention, [(1, T, 8, 128)] * 3, h100).as_text()
  assert _score_buffers(hlo, {T, G, G // 2})


def test_cudnn_takes_16_bit_inputs_only(h100):
  with pytest.raises(NotImplementedError, match="fp16/bf16"):
    _compile(lambda q, k, v: cudnn_s2_attention(q, k, v, group_size=16),
             [(1, 64, 4, 64)] * 3, h100, dtype=jnp.float32)


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=str)
def test_causal_matches_reference_float32(heads):
  (N, K), (B, T, H) = heads, (2, 24, 16)
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(x, jnp.float32)
             for x in ref.random_qkv(rng, B, T, N, K, H))
  w = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
  out, grads = ref.value_and_grads(cudnn_causal_attention,
                                   (("implementation", "xla"),), q, k, v, w)
  want, want_grads = ref.attention(
      q, k, v, ref.mask_from_keys([ref.causal_keys(T)] * N, None, B), w)
  ref.assert_close(out, want, atol=1e-5)
  for got_g, want_g in zip(grads, want_grads):
    ref.assert_close(got_g, want_g, atol=1e-4)
  with pytest.raises(ValueError, match="use the 'chunked' implementation"):
    cudnn_causal_attention(q, k, v, segment_ids_BT=jnp.zeros((B, T), int))


def test_full_attention_training_step_is_cudnn_for_h100():
  # `--full-attn` on a GPU: forward, its recomputation and backward are one
  # cuDNN call each per layer scan, never the chunked loop's [block, block]
  # score tiles, and each device attends its own rows.
  if not gpu_target.AVAILABLE:
    pytest.skip("needs JAX's CUDA plugin (requirements-test.txt)")
  from longlora_jax import LlamaConfig
  from longlora_jax.attention.chunked import DEFAULT_BLOCK, ONE_THREAD_BLOCK
  from longlora_jax.attention.dispatch import AttentionSpec
  from longlora_jax.parallel.sharding import make_mesh
  from longlora_jax.training.recipe import TrainConfig
  from longlora_jax.training.step import lower_step
  # No model dimension is a chunk block size (128, 512): any [block, block]
  # buffer left is a score tile.
  cfg = LlamaConfig(vocab_size=64, hidden_size=192, intermediate_size=160,
                    num_hidden_layers=2, num_attention_heads=2,
                    max_position_embeddings=2048)
  tc = TrainConfig(attention=AttentionSpec("full", implementation="cudnn"),
                   accum=1)
  mesh = make_mesh("fsdp=8", gpu_target.devices("h100", 8))
  with gpu_target.assume_cudnn():
    lowered, _ = lower_step(cfg, tc, mesh, ctx=2048)
  hlo = lowered.compile().as_text()
  calls = re.findall(r'custom_call_target="([^"]+)"', hlo)
  assert sorted(c for c in calls if "fmha" in c) == sorted(
      [FORWARD, FORWARD, BACKWARD])
  for line in hlo.splitlines():
    if "custom-call(" in line and "fmha" in line:
      # Operands [batch, seq, heads, head_dim]: one row per device.
      assert set(re.findall(r"bf16\[(\d+),2048,2,96\]", line)) == {"1"}
  assert not _score_buffers(hlo, {ONE_THREAD_BLOCK, DEFAULT_BLOCK})
