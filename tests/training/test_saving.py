import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax import CheckpointError, LlamaConfig, init_params, lora
from longlora_jax.attention.dispatch import AttentionSpec
from longlora_jax.sharding import make_mesh
from longlora_jax.training import saving
from longlora_jax.training.recipe import TrainConfig
from longlora_jax.training.step import init_state, jit_train_step, params_of

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4)
TC = TrainConfig(attention=AttentionSpec("full", implementation="xla"),
                 dtype="float32", remat="none", lr=1e-2, warmup=0,
                 loss_chunk=16)


def _state(rank=4, seed=1):
  params = lora.add_lora(init_params(CFG, jax.random.key(0)), rank=rank,
                         key=jax.random.key(seed))
  return init_state(params, lora.trainable_mask(params), TC)


def _steps(state, n, mesh):
  batch = {"input_ids": jnp.asarray(np.random.default_rng(0).integers(
      0, 64, (1, 8, 16)), jnp.int32)}
  step, s_shard, b_shard = jit_train_step(CFG, TC, mesh, state, batch)
  state = jax.device_put(state, s_shard)
  for _ in range(n):
    state, _ = step(state, jax.device_put(batch, b_shard))
  return state, step, b_shard, batch


def _equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_keeps_the_newest(tmp_path):
  mesh = make_mesh("fsdp=8")
  state, step, b_shard, batch = _steps(_state(), 1, mesh)
  mngr = saving.manager(tmp_path / "ckpt", keep=2)
  saved = []
  for i in range(3):
    saving.save(mngr, state, {"data": {"doc": i}, "loss": 1.5})
    saved.append(jax.device_get(state))
    # The step donates `state`: the save must already hold its own copy.
    state, _ = step(state, jax.device_put(batch, b_shard))
  mngr.wait_until_finished()
  assert mngr.all_steps() == [2, 3]
  like = jax.device_put(_state(), jax.tree.map(lambda x: x.sharding, state))
  restored, record = saving.restore(mngr, 3, like)
  assert record == {"data": {"doc": 2}, "loss": 1.5}
  assert saving.read_record(mngr, 2) == {"data": {"doc": 1}, "loss": 1.5}
  _equal(restored.trainable, saved[2].trainable)
  _equal(restored.opt_state, saved[2].opt_state)
  assert int(restored.step) == 3
  # Sharded as the state it was restored into; frozen weights are that
  # state's (they are not in the checkpoint).
  embed = restored.trainable["embed_tokens"]["embedding"]
  assert embed.sharding == like.trainable["embed_tokens"]["embedding"].sharding
  assert restored.frozen is like.frozen
  assert not list((tmp_path / "ckpt" / "3").glob("**/*frozen*"))
  _equal(lora.merge(params_of(restored)), lora.merge(params_of(
      jax.device_put(saved[2]))))
  mngr.close()


def test_restoring_into_another_model_fails(tmp_path):
  mngr = saving.manager(tmp_path / "ckpt")
  saving.save(mngr, _state(rank=4), {})
  mngr.wait_until_finished()
  with pytest.raises(CheckpointError, match=r"holds trainable.layers.self_attn.k_proj.kernel.a with shape \(2, 32, 4\), but this run.s model needs \(2, 32, 8\)"):
    saving.restore(mngr, 0, _state(rank=8))
  mngr.close()
