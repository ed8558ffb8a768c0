import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax.perf import gpu_target
from longlora_jax.attention.context import fetch, halo_size
from longlora_jax.attention.dispatch import (AttentionSpec, context_form,
                                             full_attention, get_attention,
                                             s2_attention)
from longlora_jax.attention.pallas.grouped import pallas_causal_attention
from longlora_jax.core.errors import LongLoraError
from longlora_jax.parallel.sharding import activation_mesh, make_mesh, per_row_shard
from tests.references import attention as ref

# batch, seq, q_heads, kv_heads, group, mesh: slices of L = seq / context.
CASES = [
    (1, 32, 4, 4, 8, "context=8"),          # G = 2L, shift = L
    (2, 48, 8, 2, 12, "fsdp=2,context=4"),  # G = L, shift L/2, GQA
    (4, 40, 6, 3, 10, "context=2,data=4"),  # L = 2G, odd shift, odd kv heads
    (1, 48, 9, 3, 16, "context=8"),  # 9 heads; L = 6: G, shift 8 straddle
    (1, 48, 4, 1, 24, "context=8"),  # shift = 2L; one kv head for both halves
    (1, 32, 2, 2, 32, "context=8"),  # G = seq: one group, halo of 7 slices
]


def _sharded(attention_fn, mesh_spec):
  mesh = make_mesh(mesh_spec)

  def attention(q, k, v, *, segment_ids_BT=None, **options):
    fn = functools.partial(attention_fn, **options)
    with activation_mesh(mesh):
      return per_row_shard(fn, context_form(fn))(
          q, k, v, segment_ids_BT=segment_ids_BT)
  return attention


def _check(fn, options, mask_of, B, T, N, K, mesh_spec, segments, seed=0,
           head_dim=8):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(x, jnp.float32)
             for x in ref.random_qkv(rng, B, T, N, K, head_dim))
  w = jnp.asarray(rng.standard_normal((B, T, N, head_dim)), jnp.float32)
  seg = ref.random_segments(rng, B, T) if segments else None
  out, grads = ref.value_and_grads(
      _sharded(fn, mesh_spec), options, q, k, v, w,
      None if seg is None else jnp.asarray(seg))
  want, want_grads = ref.attention(q, k, v, mask_of(seg), w)
  ref.assert_close(out, want, atol=1e-5)
  for got_g, want_g in zip(grads, want_grads):
    ref.assert_close(got_g, want_g, atol=1e-4)


@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("variant", ["flash", "roll"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_s2_matches_float64_reference(case, variant, segments):
  B, T, N, K, G, mesh_spec = case
  options = (("group_size", G), ("variant", variant), ("block_size", 5))
  mask_of = lambda seg: ref.mask_from_keys(
      ref.s2_head_keys(T, G, N, variant), seg, B)
  _check(s2_attention, options, mask_of, B, T, N, K, mesh_spec, segments)


@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("mesh_spec", ["context=8", "fsdp=2,context=4"])
def test_full_attention_matches_float64_reference(mesh_spec, segments):
  B, T, N, K = 2, 32, 4, 2
  options = (("implementation", "chunked"), ("block_size", 6))
  mask_of = lambda seg: ref.mask_from_keys(
      [ref.causal_keys(T)] * N, seg, B)
  _check(full_attention, options, mask_of, B, T, N, K, mesh_spec, segments)


# The fused kernel on each device's window (through the Pallas interpreter):
# batch, seq, q_heads, kv_heads, group, mesh, variant.
KERNEL_CASES = [
    # G = 2T: both halves need a halo of T; GQA.
    (1, 256, 4, 2, 64, "context=8", "flash"),
    # T = 2G: the unshifted half needs no halo, the shifted one G/2 (each
    # half's kv heads fetch their own).
    (2, 128, 4, 2, 16, "fsdp=2,context=4", "flash"),
    # One kv head for both halves; halo of 24 tokens at blocks of 16.
    (1, 192, 4, 1, 48, "context=8", "flash"),
    # 9 heads on 3 (SmolLM2-135M): the unshifted half has the extra head.
    (1, 192, 9, 3, 48, "context=8", "flash"),
    (1, 256, 4, 2, 64, "context=8", "roll"),
    (4, 128, 6, 3, 32, "context=2,data=4", "roll"),  # odd kv heads
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=str)
def test_s2_kernel_matches_float64_reference(case):
  B, T, N, K, G, mesh_spec, variant = case
  options = (("group_size", G), ("variant", variant),
             ("implementation", "pallas_interpret"))
  mask_of = lambda seg: ref.mask_from_keys(
      ref.s2_head_keys(T, G, N, variant), seg, B)
  _check(s2_attention, options, mask_of, B, T, N, K, mesh_spec, False,
         head_dim=64)


@pytest.mark.parametrize("T", [256, 200])  # slices of 32 and 25 tokens
def test_full_attention_kernel_matches_float64_reference(T):
  B, N, K = 1, 4, 2
  mask_of = lambda seg: ref.mask_from_keys([ref.causal_keys(T)] * N, seg, B)
  # Local queries at their global offset over all-gathered keys and values.
  _check(pallas_causal_attention, (("interpret", True),), mask_of, B, T, N,
         K, "context=8", False, head_dim=64)


def test_every_causal_attention_has_a_context_form():
  for name in ("full", "dense", "chunked", "pallas", "s2"):
    assert context_form(get_attention(name)) is not None
  assert context_form(lambda q, k, v, segment_ids_BT=None: q) is None


def test_options_bound_twice_keep_their_context_form():
  # An AttentionSpec's function with more options bound by the user.
  B, T, N, K, G, mesh_spec = CASES[1]
  mask_of = lambda seg: ref.mask_from_keys(
      ref.s2_head_keys(T, G, N, "roll"), seg, B)
  _check(get_attention(AttentionSpec("s2", variant="roll")),
         (("group_size", G), ("block_size", 5)), mask_of, B, T, N, K,
         mesh_spec, False)


def test_a_function_around_an_attention_is_refused_in_one_line():
  @functools.wraps(s2_attention)
  def wrapped(q, k, v, *, segment_ids_BT=None):
    return s2_attention(q, k, v, group_size=8, segment_ids_BT=segment_ids_BT)
  around = lambda q, k, v, *, segment_ids_BT=None: s2_attention(
      q, k, v, group_size=8, segment_ids_BT=segment_ids_BT)
  q = jnp.zeros((8, 32, 2, 8))
  run = lambda fn, mesh: _run_on(fn, mesh, q)
  # Without a context axis both run as they are.
  assert run(wrapped, "fsdp=8").shape == run(around, "fsdp=8").shape == q.shape
  for fn, message in (
      (wrapped, "a function wrapping s2_attention has no context-parallel "
                "form (it would leave the wrapper out); under a context axis "
                "pass s2_attention itself (functools.partial for its "
                "options) or an AttentionSpec"),
      (around, "has no context-parallel form; pass one the library makes (a "
               "name, an AttentionSpec, or functools.partial of s2_attention "
               "or full_attention with its options, not a function around "
               "one), or use a mesh without a context axis")):
    with pytest.raises(LongLoraError) as refused:
      run(fn, "context=8")
    assert message in str(refused.value) and "\n" not in str(refused.value)


def _run_on(fn, mesh_spec, q):
  with activation_mesh(make_mesh(mesh_spec)):
    return per_row_shard(fn, context_form(fn))(q, q, q)


@pytest.mark.parametrize("offset,length", [(3, 4), (4, 4), (9, 4), (-7, 7),
                                           (-2, 2), (13, 4), (-4, 4)])
def test_fetch_reads_global_tokens(offset, length):
  # Device c gets tokens (4c + offset + i) mod 32 of a row split in 8.
  mesh = make_mesh("context=8")
  x = jnp.arange(32)[None]
  got = jax.shard_map(
      lambda x: fetch(x, offset, length, "context", 8), mesh=mesh,
      in_specs=jax.sharding.PartitionSpec(None, "context"),
      out_specs=jax.sharding.PartitionSpec(None, "context"))(x)
  want = [(4 * c + offset + i) % 32 for c in range(8) for i in range(length)]
  np.testing.assert_array_equal(got[0], want)


def test_halo_is_the_most_a_slice_start_lies_inside_its_group():
  assert halo_size(32, 8, 8) == 4  # starts 0, 4, 8, ...: 4 into a group
  assert halo_size(40, 2, 10) == 0  # slices of whole groups
  assert halo_size(48, 8, 16) == 14  # starts 6k mod 16: 0, 6, 12, 2, 8, 14
  assert halo_size(1 << 20, 8, 1 << 18) == 1 << 17  # 1M tokens, G = 2L


def _moved(attention_fn, seq, mesh_spec="context=8"):
  """Collective bytes per device of one attention's forward and backward."""
  from jax.sharding import NamedSharding

  from longlora_jax.perf.hlo import collective_bytes
  from longlora_jax.parallel.sharding import activation_spec
  mesh = make_mesh(mesh_spec)

  def loss(q, k, v):
    with activation_mesh(mesh):
      out = per_row_shard(attention_fn, context_form(attention_fn))(q, k, v)
    return jnp.sum(out)

  x = jax.ShapeDtypeStruct((1, seq, 2, 16), jnp.float32,
                           sharding=NamedSharding(mesh, activation_spec(4)))
  hlo = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, x, x).compile().as_text()
  return collective_bytes(hlo)


def test_s2_moves_bytes_that_grow_with_the_group_not_the_sequence():
  s2 = lambda seq, group: _moved(functools.partial(
      s2_attention, group_size=group, block_size=64), seq)
  # Slices of L = seq / 8 >= G: G/2 tokens of half the heads move, no halo.
  at_1024, at_2048 = s2(1024, 128), s2(2048, 128)
  assert at_1024 == at_2048  # the same group: the same bytes
  assert at_1024["all-gather"] == 0 and at_1024["collective-permute"] > 0
  # Slices shorter than the group move more (a halo), never more than G.
  assert at_2048["collective-permute"] < s2(512, 128)["collective-permute"]
  assert s2(2048, 512)["collective-permute"] > at_2048["collective-permute"]
  full = lambda seq: _moved(functools.partial(
      full_attention, implementation="chunked", block_size=64), seq)
  assert full(2048)["all-gather"] == 4 * full(512)["all-gather"] > 0


@pytest.mark.skipif(not gpu_target.AVAILABLE,
                    reason="needs JAX's CUDA plugin (requirements-test.txt)")
@pytest.mark.parametrize("kv_heads,halo_heads", [(4, 2), (1, 1)])
def test_kernel_path_moves_each_halves_own_halo_when_compiled_for_gpu(
    kv_heads, halo_heads):
  # 8 compile-only H100s, 2048 tokens in slices of T = 256, G = 128: the
  # unshifted half needs no halo, the shifted one G/2 = 64 tokens. With 4
  # kv heads only the shifted half's 2 move; with one kv head for both
  # halves that one. Forward k and v, backward their gradients, bf16, head
  # dim 64, counted by hand.
  from jax.sharding import NamedSharding

  from longlora_jax.perf.hlo import collective_bytes
  from longlora_jax.parallel.sharding import activation_spec
  mesh = make_mesh("context=8", gpu_target.devices("h100", 8))
  attention = functools.partial(s2_attention, group_size=128)

  def loss(q, k, v):
    with activation_mesh(mesh):
      out = per_row_shard(attention, context_form(attention))(q, k, v)
    return jnp.sum(out.astype(jnp.float32))

  spec = lambda heads: jax.ShapeDtypeStruct(
      (1, 2048, heads, 64), jnp.bfloat16,
      sharding=NamedSharding(mesh, activation_spec(4)))
  hlo = jax.jit(jax.grad(loss, (0, 1, 2))).lower(
      spec(4), spec(kv_heads), spec(kv_heads)).compile().as_text()
  assert "triton" in hlo  # the kernel path, not the XLA one
  moved = collective_bytes(hlo)
  assert moved["collective-permute"] == 2 * 2 * halo_heads * 64 * 64 * 2
  assert moved["all-gather"] == moved["all-to-all"] == 0
