import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from longlora_jax import LongLoraError, init_params, preset
from longlora_jax.parallel.sharding import (batch_sharding, make_mesh, param_spec,
                                   parse_mesh, shardings_like)


@pytest.mark.parametrize("spec,want", [
    ("fsdp=8", dict(data=1, fsdp=8, context=1, tensor=1)),
    ("fsdp=-1", dict(data=1, fsdp=8, context=1, tensor=1)),
    ("data=2,fsdp=-1", dict(data=2, fsdp=4, context=1, tensor=1)),
    ("data=2, fsdp=2, tensor=2", dict(data=2, fsdp=2, context=1, tensor=2)),
    ("tensor=-1", dict(data=1, fsdp=1, context=1, tensor=8)),
    ("context=8", dict(data=1, fsdp=1, context=8, tensor=1)),
    ("fsdp=2,context=-1", dict(data=1, fsdp=2, context=4, tensor=1)),
])
def test_parse_mesh(spec, want):
  assert parse_mesh(spec, 8) == want


@pytest.mark.parametrize("spec,message", [
    ("fsdp=4", "has 4 devices but 8 are available"),
    ("fsdp=3,data=-1", "the fixed axes use 3 devices, which does not divide the 8"),
    ("pipeline=2", "unknown axis 'pipeline'"),
    ("fsdp=-1,data=-1", "only one axis may be -1"),
    ("fsdp=two", "needs an integer size"),
    ("fsdp=0", "sizes must be >= 1"),
])
def test_bad_mesh(spec, message):
  with pytest.raises(LongLoraError, match=message):
    parse_mesh(spec, 8)


@pytest.mark.parametrize("devices,hint", [(1, "fsdp=1"), (3, "fsdp=3"),
                                          (8, "fsdp=8 or data=2,fsdp=-1")])
def test_the_mesh_hint_fits_the_devices_here(devices, hint):
  with pytest.raises(LongLoraError) as error:
    parse_mesh("data=2,fsdp=8", devices)
  assert str(error.value).endswith(f"are available; e.g. use {hint}")
  for suggested in hint.split(" or "):
    parse_mesh(suggested, devices)  # Each suggestion works here.


def _specs(mesh_spec):
  mesh = make_mesh(mesh_spec)
  shapes = jax.eval_shape(lambda k: init_params(preset("llama2-7b"), k),
                          jax.random.key(0))
  specs = jax.tree_util.tree_map_with_path(
      lambda path, x: param_spec(path, x.shape, mesh), shapes)
  return specs


def test_fsdp_rules_on_llama2_7b():
  s = _specs("fsdp=8")
  attn, mlp = s["layers"]["self_attn"], s["layers"]["mlp"]
  assert attn["q_proj"]["kernel"] == P(None, "fsdp", None)  # [32, 4096, 4096]
  assert mlp["down_proj"]["kernel"] == P(None, "fsdp", None)  # [32, 11008, 4096]
  # A layer kernel splits its first axis after the layers', not the largest.
  assert mlp["up_proj"]["kernel"] == P(None, "fsdp", None)  # [32, 4096, 11008]
  assert s["layers"]["input_layernorm"]["weight"] == P(None, "fsdp")
  assert s["embed_tokens"]["embedding"] == P("fsdp", None)  # 32000 rows
  assert s["norm"]["weight"] == P("fsdp")


def test_context_devices_hold_a_part_of_the_weights_too():
  s = _specs("fsdp=2,context=4")
  fsdp_context = ("fsdp", "context")
  assert s["layers"]["self_attn"]["q_proj"]["kernel"] == P(None, fsdp_context,
                                                           None)
  assert s["layers"]["mlp"]["up_proj"]["kernel"] == P(None, fsdp_context,
                                                      None)
  assert s["embed_tokens"]["embedding"] == P(fsdp_context, None)
  c = _specs("context=8")
  assert c["layers"]["mlp"]["down_proj"]["kernel"] == P(None, "context", None)
  # With tensor parallel, the rest of the weight over fsdp x context.
  t = _specs("context=4,tensor=2")
  assert t["layers"]["self_attn"]["o_proj"]["kernel"] == P(None, "tensor",
                                                           "context")


def test_tensor_parallel_rules():
  s = _specs("fsdp=4,tensor=2")
  attn, mlp = s["layers"]["self_attn"], s["layers"]["mlp"]
  assert attn["q_proj"]["kernel"] == P(None, "fsdp", "tensor")
  assert attn["o_proj"]["kernel"] == P(None, "tensor", "fsdp")
  assert mlp["gate_proj"]["kernel"] == P(None, "fsdp", "tensor")
  assert mlp["down_proj"]["kernel"] == P(None, "tensor", "fsdp")
  assert s["lm_head"]["kernel"] == P("fsdp", "tensor")


def test_indivisible_dims_stay_replicated():
  mesh = make_mesh("fsdp=8")
  assert param_spec((), (3, 5), mesh) == P(None, None)
  assert param_spec((), (), mesh) == P()


def test_arrays_really_are_sharded():
  cfg = preset("llama2-7b").__class__(
      vocab_size=64, hidden_size=32, intermediate_size=48,
      num_hidden_layers=2, num_attention_heads=4)
  params = init_params(cfg, jax.random.key(0))
  mesh = make_mesh("data=2,fsdp=4")
  sharded = jax.device_put(params, shardings_like(params, mesh))
  q = sharded["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.shard_shape(q.shape) == (2, 8, 32)
  assert len(q.addressable_shards) == 8
  np.testing.assert_array_equal(q, params["layers"]["self_attn"]["q_proj"]["kernel"])
  batch = jax.device_put(jnp.zeros((8, 16), jnp.int32), batch_sharding(mesh))
  assert batch.sharding.shard_shape(batch.shape) == (1, 16)


def _rows_seen(mesh_spec, segments):
  """Runs `per_row_shard` under a mesh; returns (batch sizes the attention
  function saw, its output, the unsharded output)."""
  from longlora_jax.attention.dense import dense_causal_attention
  from longlora_jax.parallel.sharding import activation_mesh, per_row_shard
  seen = []

  def attention(q, k, v, *, segment_ids_BT=None):
    seen.append((q.shape[0], None if segment_ids_BT is None
                 else segment_ids_BT.shape[0]))
    return dense_causal_attention(q, k, v, segment_ids_BT=segment_ids_BT)

  mesh = make_mesh(mesh_spec)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((8, 16, 4, 8)), jnp.float32)
             for _ in range(3))
  seg = jnp.asarray(np.repeat([[0] * 9 + [1] * 7], 8, 0)) if segments else None

  def sharded(q, k, v, seg):
    with activation_mesh(mesh):
      return per_row_shard(attention)(q, k, v, segment_ids_BT=seg)
  out = jax.jit(sharded)(*(jax.device_put(x, batch_sharding(mesh, x.ndim))
                           for x in (q, k, v)), seg)
  return seen, out, dense_causal_attention(q, k, v, segment_ids_BT=seg)


@pytest.mark.parametrize("mesh_spec, rows", [
    ("fsdp=8", 1), ("data=2,fsdp=2,tensor=2", 2), ("tensor=8", 8)])
@pytest.mark.parametrize("segments", [False, True])
def test_attention_runs_on_each_devices_own_rows(mesh_spec, rows, segments):
  seen, out, want = _rows_seen(mesh_spec, segments)
  # Traced once, on one device's rows (8 rows over data x fsdp devices).
  assert seen == [(rows, rows if segments else None)]
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_an_attention_without_a_context_form_is_a_user_error():
  from longlora_jax.parallel.sharding import activation_mesh, per_row_shard
  q = jnp.zeros((1, 16, 2, 8))
  mine = lambda q, k, v, *, segment_ids_BT=None: q
  with activation_mesh(make_mesh("context=8")):
    with pytest.raises(LongLoraError, match="no context-parallel form"):
      per_row_shard(mine)(q, q, q)
