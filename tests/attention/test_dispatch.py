import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax import LlamaConfig, LongLoraError, forward, init_params
from longlora_jax.attention.chunked import chunked_causal_attention
from longlora_jax.attention.dense import dense_causal_attention
from longlora_jax.attention import dispatch
from longlora_jax.attention.by_group import S2ByGroup
from longlora_jax.attention.dispatch import (ATTENTION_FNS, AttentionSpec,
                                             full_attention, fused_for,
                                             get_attention, s2_attention)
from longlora_jax.attention.pallas.grouped import pallas_causal_attention
from tests.references import attention as ref


def test_registry():
  assert ATTENTION_FNS == {"full": full_attention,
                           "dense": dense_causal_attention,
                           "chunked": chunked_causal_attention,
                           "s2": s2_attention,
                           "pallas": pallas_causal_attention}
  for name, fn in ATTENTION_FNS.items():
    assert get_attention(name) is fn
  custom = functools.partial(s2_attention, variant="roll")
  assert get_attention(custom) is custom
  with pytest.raises(ValueError, match="unknown attention 'auto'"):
    get_attention("auto")


_logits = jax.jit(forward, static_argnums=0,
                  static_argnames=("attention",))


def test_model_runs_with_each_attention():
  config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, initializer_range=0.3)
  params = init_params(config, jax.random.key(0))
  rng = np.random.default_rng(6)
  ids = jnp.asarray(rng.integers(0, 64, (2, 32)))
  seg = jnp.asarray(ref.random_segments(rng, 2, 32))
  logits = {name: np.asarray(_logits(config, params, ids, attention=name))
            for name in ATTENTION_FNS if name != "pallas"}  # pallas: GPU only
  full = logits["dense"]
  assert np.abs(full).std() > 0.3  # large enough for 1e-4 to matter
  np.testing.assert_allclose(logits["chunked"], full, atol=1e-4, rtol=0)
  # "full" off NVIDIA GPUs: the chunked path, exactly.
  np.testing.assert_array_equal(logits["full"], logits["chunked"])
  with_seg = [_logits(config, params, ids, attention=name, segment_ids_BT=seg)
              for name in ("dense", "chunked")]
  np.testing.assert_allclose(with_seg[1], with_seg[0], atol=1e-4, rtol=0)
  # S², default groups of 8: the first G/2 = 4 tokens see the same keys as
  # with full attention in every head; tokens past the first group do not.
  np.testing.assert_allclose(logits["s2"][:, :4], full[:, :4], atol=1e-5)
  assert np.abs(logits["s2"][:, 8:] - full[:, 8:]).max() > 1e-2
  # Options through a callable.
  roll = functools.partial(s2_attention, variant="roll", group_size=16,
                           implementation="chunked", block_size=4)
  assert np.isfinite(_logits(config, params, ids, attention=roll)).all()


@pytest.mark.parametrize("preference", [("pallas", "cudnn"),
                                        ("cudnn", "pallas")])
def test_auto_takes_a_fused_implementation_only_on_a_gpu_for_its_shapes(
    preference, monkeypatch):
  from longlora_jax.attention.pallas import grouped
  assert grouped.AVAILABLE
  monkeypatch.setattr(dispatch, "FUSED_PREFERENCE", preference)
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert fused_for(128, bf16, platform="gpu") == preference[0]
  assert fused_for(64, jnp.float16, platform="gpu") == preference[0]
  assert fused_for(96, bf16, platform="gpu") == "cudnn"  # no Pallas tiles
  assert fused_for(128, f32, platform="gpu") == "pallas"  # cuDNN: 16-bit
  assert fused_for(100, bf16, platform="gpu") is None  # neither
  assert fused_for(96, f32, platform="gpu") is None
  assert fused_for(128, bf16, packed=True, platform="gpu") is None
  assert fused_for(128, bf16, platform="cpu") is None
  assert fused_for(128, bf16) is None  # the tests run on the CPU


@pytest.mark.parametrize("kind,nvidia", [("NVIDIA H100 80GB HBM3", True),
                                         ("AMD Instinct MI300X", False)])
def test_auto_takes_fused_paths_on_nvidia_gpus_only(kind, nvidia,
                                                    monkeypatch):
  # ROCm reports the platform "gpu" too; cuDNN and the tuned kernel are
  # NVIDIA's.
  class Device:
    device_kind = kind
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *a: [Device()])
  assert (fused_for(128, jnp.bfloat16) is not None) == nvidia


@pytest.mark.parametrize("implementation", ["auto", "chunked", "dense",
                                            "cudnn"])
def test_full_attention_spec_against_float64(implementation, monkeypatch):
  # "cudnn" runs here through jax.nn.dot_product_attention's XLA path.
  from longlora_jax.attention import cudnn_grouped
  causal = cudnn_grouped.cudnn_causal_attention
  monkeypatch.setattr(cudnn_grouped, "cudnn_causal_attention",
                      lambda *a, **k: causal(*a, **k, implementation="xla"))
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(x, jnp.float32)
             for x in ref.random_qkv(rng, 1, 40, 4, 2, 8))
  fn = get_attention(AttentionSpec("full", implementation=implementation))
  want = ref.attention(q, k, v, ref.mask_from_keys(
      [ref.causal_keys(40)] * 4, None, 1))
  ref.assert_close(fn(q, k, v), want, atol=1e-5)
  with pytest.raises(ValueError, match="unknown full attention"):
    AttentionSpec("full", implementation="roll")


_H100_MESH = jax.sharding.AbstractMesh(
    (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"))


def test_context_implementation_fuses_where_auto_would_with_the_window_kernel():
  from longlora_jax.attention.dispatch import context_implementation
  gpu = lambda impl, **kw: context_implementation(
      impl, 64, jnp.bfloat16, **kw)
  assert context_implementation("auto", 64, jnp.bfloat16) == "chunked"  # CPU
  with jax.sharding.use_abstract_mesh(_H100_MESH):
    assert gpu("auto") == "pallas"  # not cuDNN: its masks are static
    assert gpu("cudnn") == gpu("pallas") == "pallas"
    assert gpu("auto", packed=True) == "chunked"  # the kernel: no segments
    assert context_implementation("auto", 96, jnp.bfloat16) == "chunked"
    assert gpu("chunked") == gpu("dense") == "chunked"
  assert gpu("pallas_interpret") == "pallas_interpret"


def test_full_attention_runs_the_kernel_it_names():
  q, k, v = (jnp.asarray(x, jnp.float32) for x in ref.random_qkv(
      np.random.default_rng(4), 1, 64, 2, 1, 64))
  np.testing.assert_array_equal(
      full_attention(q, k, v, implementation="pallas_interpret"),
      pallas_causal_attention(q, k, v, interpret=True))
  np.testing.assert_array_equal(
      full_attention(q, k, v, implementation="dense"),
      dense_causal_attention(q, k, v))


def test_cached_attention_takes_the_loop_off_nvidia_gpus():
  from longlora_jax.attention.cached import chunked_cached_attention
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.standard_normal((1, 3, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 1, 2, 8, 512)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 1, 2, 512, 8)), jnp.float32)
  np.testing.assert_array_equal(
      dispatch.cached_attention(q, k, v, 1, 20),
      chunked_cached_attention(q, k, v, 1, 20))
  for implementation in ("dense", "cudnn"):
    with pytest.raises(ValueError, match="unknown cached attention "
                       f"implementation '{implementation}'"):
      dispatch.cached_attention(q, k, v, 1, 20, implementation=implementation)


def test_every_implementation_is_one_a_spec_takes():
  assert dispatch.IMPLEMENTATIONS[:3] == ("auto", *dispatch.FUSED_PREFERENCE)
  for implementation in dispatch.IMPLEMENTATIONS:
    for kind in dispatch.KINDS:
      AttentionSpec(kind, implementation=implementation)
  with pytest.raises(ValueError, match="unknown S²-Attn implementation 'xla'"):
    AttentionSpec("s2", implementation="xla")


def test_a_by_group_spec_gives_the_pieces_attention():
  fn = get_attention(AttentionSpec(variant="roll", group_ratio=0.5,
                                   implementation="chunked", by_group=True))
  assert isinstance(fn, S2ByGroup)
  assert (fn.variant, fn.group_ratio) == ("roll", 0.5)
  assert fn.attend.func is full_attention
  assert fn.attend.keywords == {"implementation": "chunked"}
  with pytest.raises(ValueError, match="not full attention"):
    AttentionSpec("full", by_group=True)


def test_a_layers_window_decides_its_attention(monkeypatch):
  # S²-Attn (one spec for every layer) runs on the global layer only; the
  # local layer keeps its window, by "chunked" even where "auto" would fuse
  # (on a GPU), since no fused kernel applies a window.
  B, T, N, K, window = 2, 32, 4, 2, 6
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(x, jnp.float32)
             for x in ref.random_qkv(rng, B, T, N, K, 8))
  attend = dispatch.layer_attention(get_attention(AttentionSpec("s2")),
                                    window, (True, False))
  s2 = ref.attention(q, k, v, ref.mask_from_keys(
      ref.s2_head_keys(T, T // 4, N, "flash"), None, B))
  local = ref.attention(q, k, v, ref.mask_from_keys(
      [ref.window_keys(T, window)] * N, None, B))
  run = jax.jit(lambda layer: attend(q, k, v, layer=layer))
  ref.assert_close(run(0), local, atol=1e-5)
  ref.assert_close(run(1), s2, atol=1e-5)
  monkeypatch.setattr(dispatch, "fused_for", lambda *a, **k: "cudnn")
  every = dispatch.layer_attention(get_attention(AttentionSpec("full")),
                                   window, (True, True))
  ref.assert_close(every(q, k, v, layer=0), local, atol=1e-5)


def test_auto_never_takes_an_implementation_without_the_soft_cap(monkeypatch):
  # On an NVIDIA GPU (faked), "auto" would take cuDNN for these bfloat16
  # shapes; with a cap it must take one that applies it, so S²-Attn, full
  # attention and a Gemma-style layer all give the capped float64 values.
  monkeypatch.setattr(dispatch, "on_nvidia_gpu", lambda platform=None: True)
  assert fused_for(16, jnp.bfloat16) == "cudnn"
  assert fused_for(16, jnp.bfloat16, softcap=50.0) is None  # no Pallas tiles
  assert fused_for(64, jnp.bfloat16) == "cudnn"
  assert fused_for(64, jnp.bfloat16, softcap=50.0) == "pallas"
  B, T, N, K, cap = 1, 16, 4, 2, 1.0
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(x, jnp.bfloat16)
             for x in ref.random_qkv(rng, B, T, N, K, 16))
  causal = ref.mask_from_keys([ref.causal_keys(T)] * N, None, B)
  s2 = ref.mask_from_keys(ref.s2_head_keys(T, T // 4, N, "flash"), None, B)
  for fn, mask in ((full_attention, causal), (s2_attention, s2)):
    want = ref.attention(q, k, v, mask, softcap=cap)
    assert np.abs(want - ref.attention(q, k, v, mask)).max() > 0.2
    ref.assert_close(fn(q, k, v, softcap=cap), want, relative=2e-2)
    layer = dispatch.layer_attention(fn, 8, (False,), softcap=cap)
    ref.assert_close(layer(q, k, v, layer=0), want, relative=2e-2)
  with pytest.raises(LongLoraError, match="'cudnn' has no logit soft-cap"):
    full_attention(q, k, v, implementation="cudnn", softcap=cap)
  with pytest.raises(LongLoraError, match="applies no logit soft-cap"):
    dispatch.layer_attention(lambda *a, **kw: a[0], None, (False,), 2.0)
