"""The training step: loss, gradient accumulation, clipping, AdamW, sharding.

The state holds the trainable leaves (float32 master copies) apart from the
frozen ones (which keep their dtype, e.g. bfloat16), so the optimizer state
exists only for what is trained. One jitted step runs all micro-batches
(`lax.scan`) and one optimizer update.
"""

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from longlora_jax import lora
from longlora_jax.attention import AttentionFn
from longlora_jax.config import LlamaConfig
from longlora_jax.errors import LongLoraError
from longlora_jax.loss import chunked_cross_entropy, next_token_targets
from longlora_jax.model import hidden_states
from longlora_jax.s2_attention import s2_group_size
from longlora_jax.sharding import (BATCH_AXES, activation_mesh,
                                   batch_parallelism, shardings_like)

SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation recipe; defaults are the official LongLoRA ones.

  b2 defaults to 0.999, what the official scripts run (HF Trainer's
  default); the paper states 0.95.
  """
  attention: str | AttentionFn = "s2"
  remat: str = "full"
  compute_dtype: str = "bfloat16"
  accum_steps: int = 1
  loss_chunk: int = 2048
  learning_rate: float = 2e-5
  warmup_steps: int = 20
  schedule: str = "constant"
  total_steps: int = 1000
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise LongLoraError(f"unknown schedule {self.schedule!r}; choose one of "
                          f"{', '.join(SCHEDULES)}")
    if self.accum_steps < 1:
      raise LongLoraError(f"accum_steps must be >= 1, got {self.accum_steps}")


def learning_rate(tc: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0, then constant, cosine or linear decay to 0."""
  warmup = optax.linear_schedule(0.0, tc.learning_rate, max(tc.warmup_steps, 1))
  rest = max(tc.total_steps - tc.warmup_steps, 1)
  after = {
      "constant": optax.constant_schedule(tc.learning_rate),
      "cosine": optax.cosine_decay_schedule(tc.learning_rate, rest),
      "linear": optax.linear_schedule(tc.learning_rate, 0.0, rest),
  }[tc.schedule]
  if tc.warmup_steps == 0:
    return after
  return optax.join_schedules([warmup, after], [tc.warmup_steps])


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(tc.max_grad_norm),
      optax.adamw(learning_rate(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps,
                  weight_decay=tc.weight_decay))


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: Any  # float32 master copies of the trained leaves
  frozen: Any  # everything else, in its own dtype
  opt_state: Any


def init_state(params, mask, tc: TrainConfig) -> TrainState:
  """Splits `params` by the trainable `mask` and builds the optimizer state."""
  trainable, frozen = lora.split(params, mask)
  trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                    frozen=frozen,
                    opt_state=make_optimizer(tc).init(trainable))


def params_of(state: TrainState):
  """The full parameter tree (trainable leaves in float32)."""
  return lora.combine(state.trainable, state.frozen)


def micro_batch_loss(config: LlamaConfig, tc: TrainConfig, params, batch):
  """Per row (sum of token losses, scored tokens) of a micro-batch `[batch, seq]`."""
  input_ids = batch["input_ids"]
  labels = batch.get("labels", input_ids)
  h_BTD = hidden_states(
      config, params, input_ids, attention=tc.attention,
      positions_BT=batch.get("positions"),
      segment_ids_BT=batch.get("segment_ids"), dtype=jnp.dtype(tc.compute_dtype),
      remat=tc.remat)
  return chunked_cross_entropy(config, params, h_BTD,
                               next_token_targets(labels),
                               chunk_size=tc.loss_chunk)


def train_step(state: TrainState, batch, *, config: LlamaConfig,
               tc: TrainConfig):
  """One optimizer step over `[accum, batch, seq]` micro-batches.

  The loss is the mean over all scored tokens of all micro-batches (each
  token weighs the same, whatever micro-batch it is in).
  """
  def loss_sum(trainable, micro):
    losses, counts = micro_batch_loss(
        config, tc, lora.combine(trainable, state.frozen), micro)
    return jnp.sum(losses), jnp.sum(counts)

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def accumulate(grads, micro):
    (loss, count), g = grad_fn(state.trainable, micro)
    return jax.tree.map(jnp.add, grads, g), (loss, count)

  zeros = jax.tree.map(jnp.zeros_like, state.trainable)
  grads, (losses, counts) = jax.lax.scan(accumulate, zeros, batch)
  tokens = jnp.sum(counts)
  grads = jax.tree.map(lambda g: g / jnp.maximum(tokens, 1.0), grads)
  updates, opt_state = make_optimizer(tc).update(grads, state.opt_state,
                                                 state.trainable)
  new_state = TrainState(step=state.step + 1,
                         trainable=optax.apply_updates(state.trainable, updates),
                         frozen=state.frozen, opt_state=opt_state)
  metrics = {
      "loss": jnp.sum(losses) / jnp.maximum(tokens, 1.0),
      "tokens": tokens,
      "grad_norm": optax.global_norm(grads),
      "learning_rate": learning_rate(tc)(state.step),
  }
  return new_state, metrics


def state_shardings(state, mesh: Mesh):
  """Every leaf sharded by the parameter rules; optimizer state follows its
  parameter because its path ends in the parameter's path."""
  return shardings_like(state, mesh)


def batch_shardings(batch, mesh: Mesh):
  """`[accum, batch, seq]` arrays: the batch axis over data x fsdp."""
  return jax.tree.map(
      lambda x: NamedSharding(mesh, P(None, BATCH_AXES, *([None] * (x.ndim - 2)))),
      batch)


def check_batch(config: LlamaConfig, tc: TrainConfig,
                batch_shape: tuple[int, ...], mesh: Mesh) -> None:
  """Shape errors a user can make, caught before anything compiles."""
  accum, per_step, seq = batch_shape
  ways = batch_parallelism(mesh)
  if per_step % ways:
    raise LongLoraError(
        f"the batch of {per_step} sequences per micro-batch does not divide "
        f"over the {ways} data-parallel devices (data x fsdp); use a multiple "
        f"of {ways}")
  if tc.attention == "s2":
    try:
      s2_group_size(seq, config.num_attention_heads)
    except ValueError as e:
      # Groups of ctx/4 with an even half-shift: ctx must be a multiple of 8.
      hint = (f"; use a context that is a multiple of 8, e.g. "
              f"{max(seq // 8 * 8, 8)} or {seq // 8 * 8 + 8}" if seq % 8 else "")
      raise LongLoraError(f"{e}{hint}") from None


def jit_train_step(config: LlamaConfig, tc: TrainConfig, mesh: Mesh, state,
                   batch):
  """`train_step` jitted with explicit shardings and the state donated.

  `state` and `batch` may be arrays or `jax.ShapeDtypeStruct`s; only their
  shapes are used. Returns (jitted step, state shardings, batch shardings).
  """
  check_batch(config, tc, jax.tree.leaves(batch)[0].shape, mesh)
  s_shard = state_shardings(state, mesh)
  b_shard = batch_shardings(batch, mesh)
  metric_shard = NamedSharding(mesh, P())
  def step_fn(s, b):
    with activation_mesh(mesh):
      return train_step(s, b, config=config, tc=tc)

  step = jax.jit(
      step_fn,
      in_shardings=(s_shard, b_shard),
      out_shardings=(s_shard, metric_shard), donate_argnums=0)
  return step, s_shard, b_shard
