"""A regression guard for the paper's two findings, by training: a task
that only S²-Attn's shift and LoRA+'s trainable set can learn.

At the demo's scale natural text does not separate the arms
(`bench.ablation`), so this task is built to: a future change that
silently drops the shift (`groups.shift`, `s2`) or the embedding and
norms from LoRA+ (`lora.LORA_PLUS`, `recipe.MODES`) makes the guarded arm
fail to learn it. Every arm trains through the commands' train step
(`step.initial_state`, `step.jit_train_step`), compiled once per arm.

The task: rows of T = 64 tokens in S²-Attn groups of G = 8. Each group
g >= 1 opens with a query token Q; the token after it, the only scored
target, is the key (one of K = 8) hidden among fillers in the last G/2
tokens of group g - 1. Unshifted groups never let the query see that
window; the shifted heads' groups [gG - G/2, gG + G/2) do.

Two changes to the base model make the trainable set matter: the keys
come in pairs with one embedding (only a trained embedding tells a pair
apart: loss >= ln 2 without it), and the final norm's weight is zero
(every logit is zero, loss exactly ln V, until the norm trains).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax import LlamaConfig, init_params
from longlora_jax.attention.dispatch import AttentionSpec
from longlora_jax.model.loss import IGNORE_INDEX
from longlora_jax.parallel.sharding import make_mesh
from longlora_jax.training.recipe import TrainConfig
from longlora_jax.training.step import initial_state, jit_train_step

V, T, G, K, ROWS, STEPS = 16, 64, 8, 8, 16, 30
Q = V - 1  # the query; keys 0 .. K - 1, fillers K .. V - 2
CFG = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, initializer_range=0.2)
# (variant, mode): each trains the same base on the same batches.
ARMS = (("flash", "lora+"), ("roll", "lora+"), ("none", "lora+"),
        ("flash", "lora"))
LAST = 5


def _batch(rng):
  ids_BT = rng.integers(K, Q, (ROWS, T))
  labels_BT = np.full_like(ids_BT, IGNORE_INDEX)
  rows = np.arange(ROWS)
  for start in range(G, T, G):
    key_B = rng.integers(0, K, ROWS)
    ids_BT[rows, start - G // 2 + rng.integers(0, G // 2, ROWS)] = key_B
    ids_BT[:, start] = Q
    ids_BT[:, start + 1] = labels_BT[:, start + 1] = key_B
  # [accum = 1, batch, seq], as the step takes it.
  return {"input_ids": jnp.asarray(ids_BT[None], jnp.int32),
          "labels": jnp.asarray(labels_BT[None], jnp.int32)}


def _base():
  params = init_params(CFG, jax.random.key(0), dtype=jnp.float32)
  e_VD = params["embed_tokens"]["embedding"]
  params["embed_tokens"]["embedding"] = e_VD.at[1:K:2].set(e_VD[0:K:2])
  params["norm"]["weight"] = jnp.zeros_like(params["norm"]["weight"])
  return params


def _train(base, variant, mode):
  tc = TrainConfig(attention=AttentionSpec("s2", variant=variant,
                                           group_ratio=G / T),
                   dtype="float32", accum=1, lr=3e-2, warmup=0,
                   loss_chunk=T, steps=STEPS)
  mesh = make_mesh("fsdp=1", jax.devices()[:1])
  # The step donates the state; the frozen base weights are the arms'.
  state = initial_state(jax.tree.map(jnp.copy, base), tc, mode=mode)
  rng = np.random.default_rng(0)
  step, s_shard, b_shard = jit_train_step(CFG, tc, mesh, state, _batch(rng))
  state, losses = jax.device_put(state, s_shard), []
  for _ in range(STEPS):
    state, metrics = step(state, jax.device_put(_batch(rng), b_shard))
    losses.append(float(metrics["loss"]))
  return float(np.mean(losses[-LAST:]))


@pytest.fixture(scope="module")
def losses():
  """arm -> mean loss of its last steps, each on a fresh batch scored
  before the step trains on it."""
  base = _base()
  return {arm: _train(base, *arm) for arm in ARMS}


def test_the_shift_carries_the_key_across_groups(losses):
  # Without the shift the query sees only itself: its prediction is one
  # distribution for every row, and the key is uniform over K, so the loss
  # cannot go below ln K (measured on batches the model has not trained on).
  assert losses["none", "lora+"] > np.log(K) - 0.05, losses
  # With it the key is a look-up; below half of the ln 2 that keys of one
  # embedding would leave, far below ln K. Both shifted variants (the
  # roll's wrap moves only the first G/2 tokens, which score nothing).
  for variant in ("flash", "roll"):
    assert losses[variant, "lora+"] < np.log(2) / 2, (
        f"S²-Attn {variant} did not learn a task only its shift makes "
        "learnable: is the shift (attention/groups.py, s2.py) or LoRA+'s "
        "trainable set broken?", losses)


def test_lora_plus_trains_what_lora_alone_cannot(losses):
  # LoRA on q,k,v,o alone leaves the final norm at zero: every logit zero.
  np.testing.assert_allclose(losses["flash", "lora"], np.log(V), rtol=1e-5)
  # Frozen embeddings would leave >= ln 2, a frozen norm ln V.
  assert losses["flash", "lora+"] < np.log(2) / 2, (
      "LoRA+ did not learn what needs its trainable embedding and norms: "
      "is lora.LORA_PLUS or recipe.MODES broken?", losses)
