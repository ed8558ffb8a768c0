"""The training step: loss, gradient accumulation, clipping, AdamW, sharding.

The state holds the trainable leaves (float32 master copies) apart from the
frozen ones (which keep their dtype, e.g. bfloat16), so the optimizer state
exists only for what is trained. One jitted step runs all micro-batches
(`lax.scan`) and one optimizer update.
"""

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from longlora_jax.model import lora, nf4
from longlora_jax.attention.groups import s2_group_size
from longlora_jax.model.config import LlamaConfig
from longlora_jax.core.errors import LongLoraError
from longlora_jax.model.loss import chunked_cross_entropy, next_token_targets
from longlora_jax.model.llama import hidden_states, init_params
from longlora_jax.parallel.sharding import (activation_mesh, activation_spec,
                                   batch_parallelism, context_parallelism,
                                   shardings_like)
from longlora_jax.training.recipe import MODES, RunSpec, TrainConfig


def learning_rate(tc: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0, then constant, cosine or linear decay to 0."""
  warmup = optax.linear_schedule(0.0, tc.lr, max(tc.warmup, 1))
  rest = max(tc.steps - tc.warmup, 1)
  after = {
      "constant": optax.constant_schedule(tc.lr),
      "cosine": optax.cosine_decay_schedule(tc.lr, rest),
      "linear": optax.linear_schedule(tc.lr, 0.0, rest),
  }[tc.schedule]
  if tc.warmup == 0:
    return after
  return optax.join_schedules([warmup, after], [tc.warmup])


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(tc.max_grad_norm),
      optax.adamw(learning_rate(tc), b1=tc.beta1, b2=tc.beta2, eps=tc.eps,
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


def initial_state(params, tc: TrainConfig, *, mode: str = "lora+",
                  lora_rank: int = 8, lora_alpha: float = 16.0,
                  seed: int = 0) -> TrainState:
  """A run's state at step 0 from the base `params`: LoRA added (seeded by
  `seed`) and the trainable set (`MODES[mode]`) split off; "full" trains
  every weight."""
  if mode == "full":
    return init_state(params, lora.full_mask(params), tc)
  params = lora.add_lora(params, rank=lora_rank, alpha=lora_alpha,
                         key=jax.random.key(seed))
  return init_state(params, lora.trainable_mask(params, MODES[mode]), tc)


def initial_run_state(spec: RunSpec, params, mesh: Mesh) -> TrainState:
  """The state of the run `spec` at step 0 from its base `params` (which it
  consumes), in its shardings on `mesh`: the new leaves (LoRA factors,
  float32 copies, optimizer moments) are made in their shards, and the
  frozen weights stay in the buffers they were loaded into."""
  init = functools.partial(
      initial_state, tc=spec.recipe, mode=spec.mode, lora_rank=spec.lora_rank,
      lora_alpha=spec.lora_alpha, seed=spec.seed)
  shape = jax.eval_shape(init, params)
  # Made on the device, where the new leaves can take the donated buffers,
  # then moved to host memory if the run keeps them there.
  state = jax.jit(init, out_shardings=state_shardings(shape, mesh),
                  donate_argnums=0)(params)
  return jax.device_put(state, state_shardings(shape, mesh,
                                               spec.recipe.offload))


def params_of(state: TrainState):
  """The full parameter tree (trainable leaves in float32), on the device."""
  return lora.combine(on_device(state.trainable), state.frozen)


def micro_batch_loss(config: LlamaConfig, tc: TrainConfig, params, batch):
  """Per row (sum of token losses, scored tokens) of a micro-batch `[batch, seq]`."""
  input_ids = batch["input_ids"]
  labels = batch.get("labels", input_ids)
  h_BTD = hidden_states(
      config, params, input_ids, attention=tc.attention,
      positions_BT=batch.get("positions"),
      segment_ids_BT=batch.get("segment_ids"), dtype=jnp.dtype(tc.dtype),
      remat=tc.remat_policy)
  return chunked_cross_entropy(config, params, h_BTD,
                               next_token_targets(labels),
                               chunk_size=tc.loss_chunk)


def gradients(trainable, frozen, step, batch, *, config: LlamaConfig,
              tc: TrainConfig):
  """(gradients, metrics) of `[accum, batch, seq]` micro-batches: the mean
  over all scored tokens of all micro-batches (each token weighs the same,
  whatever micro-batch it is in)."""
  def loss_sum(trainable, micro):
    losses, counts = micro_batch_loss(
        config, tc, lora.combine(trainable, frozen), micro)
    return jnp.sum(losses), jnp.sum(counts)

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def accumulate(grads, micro):
    (loss, count), g = grad_fn(trainable, micro)
    return jax.tree.map(jnp.add, grads, g), (loss, count)

  zeros = jax.tree.map(jnp.zeros_like, trainable)
  grads, (losses, counts) = jax.lax.scan(accumulate, zeros, batch)
  tokens = jnp.sum(counts)
  grads = jax.tree.map(lambda g: g / jnp.maximum(tokens, 1.0), grads)
  return grads, {
      "loss": jnp.sum(losses) / jnp.maximum(tokens, 1.0),
      "tokens": tokens,
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": learning_rate(tc)(step),
  }


def update(step, trainable, opt_state, grads, *, tc: TrainConfig):
  """(step + 1, trainable, optimizer state) after one AdamW update."""
  updates, opt_state = make_optimizer(tc).update(grads, opt_state, trainable)
  return step + 1, optax.apply_updates(trainable, updates), opt_state


def train_step(state: TrainState, batch, *, config: LlamaConfig,
               tc: TrainConfig):
  """One optimizer step over `[accum, batch, seq]` micro-batches."""
  grads, metrics = gradients(state.trainable, state.frozen, state.step, batch,
                             config=config, tc=tc)
  step, trainable, opt_state = update(state.step, state.trainable,
                                      state.opt_state, grads, tc=tc)
  return state.replace(step=step, trainable=trainable,
                       opt_state=opt_state), metrics


def state_shardings(state, mesh: Mesh, offload: str = "none"):
  """Every leaf sharded by the parameter rules; optimizer state follows its
  parameter because its path ends in the parameter's path. With `offload`
  naming "optimizer", the trained leaves and the optimizer state are in
  pinned host memory (where the platform has it; compile-only devices
  report no memories)."""
  shardings = shardings_like(state, mesh)
  if "optimizer" not in offload.split(","):
    return shardings
  return shardings.replace(
      trainable=_in_memory(shardings.trainable, "pinned_host"),
      opt_state=_in_memory(shardings.opt_state, "pinned_host"))


def _in_memory(shardings, kind: str):
  """`shardings` (a tree) in memory `kind` ("device", "pinned_host")."""
  return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings)


@dataclasses.dataclass(frozen=True)
class OffloadedStep:
  """The train step as two programs, for `--offload optimizer`, with what
  AdamW updates (its moments and the float32 master copies of the trained
  leaves) in pinned host memory, as ZeRO-Offload keeps them:

  - the gradients, where the step's activations peak: they take a device
    copy of the trained leaves and return the gradients in its buffers;
  - the update, which brings the masters and moments to the device while
    nothing else of the step is there, and sends them back.

  The same arithmetic as `train_step`. Called as the fused step is,
  `(state, batch) -> (state, metrics)`; `lower` and `compile` mirror
  `jax.jit`'s, so a run compiles both before its first step and a memory
  plan reads both programs."""
  grads_fn: Any
  update_fn: Any
  device: Any  # the trained leaves' shardings in device memory

  def __call__(self, state: TrainState, batch):
    grads, metrics = self.grads_fn(jax.device_put(state.trainable, self.device),
                                   state.frozen, state.step, batch)
    step, trainable, opt_state = self.update_fn(
        state.step, state.trainable, state.opt_state, grads)
    return state.replace(step=step, trainable=trainable,
                         opt_state=opt_state), metrics

  def lower(self, state, batch) -> "OffloadedStep":
    on_device = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=s), state.trainable, self.device)
    return OffloadedStep(
        self.grads_fn.lower(on_device, state.frozen, state.step, batch),
        self.update_fn.lower(state.step, state.trainable, state.opt_state,
                             on_device), self.device)

  def compile(self, *args, **kwargs) -> "OffloadedStep":
    return OffloadedStep(self.grads_fn.compile(*args, **kwargs),
                         self.update_fn.compile(*args, **kwargs), self.device)


def on_device(tree):
  """`tree` with its leaves in pinned host memory (`--offload optimizer`)
  copied to device memory, for programs that read them."""
  def put(x):
    sharding = getattr(x, "sharding", None)
    if getattr(sharding, "memory_kind", None) != "pinned_host":
      return x
    return jax.device_put(x, sharding.with_memory_kind("device"))
  return jax.tree.map(put, tree)


def batch_shardings(batch, mesh: Mesh):
  """`[accum, batch, seq]` arrays: the batch axis over data x fsdp, the
  sequence over context."""
  return jax.tree.map(
      lambda x: NamedSharding(mesh, P(None, *activation_spec(x.ndim - 1))),
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
  context = context_parallelism(mesh)
  if seq % context:
    raise LongLoraError(
        f"the context of {seq} tokens does not split over the {context} "
        f"devices of the mesh's context axis; use a multiple of {context}, "
        f"e.g. {seq // context * context + context}")
  if tc.attention.kind == "s2":
    try:
      s2_group_size(seq, group_ratio=tc.attention.group_ratio)
    except ValueError as e:
      # Groups of ctx/4 with an even half-shift: ctx must be a multiple of 8.
      hint = (f"; use a context that is a multiple of 8, e.g. "
              f"{max(seq // 8 * 8, 8)} or {seq // 8 * 8 + 8}" if seq % 8 else "")
      raise LongLoraError(f"{e}{hint}") from None


def jit_train_step(config: LlamaConfig, tc: TrainConfig, mesh: Mesh, state,
                   batch):
  """`train_step` jitted with explicit shardings and the state donated; an
  `OffloadedStep` where `tc` offloads the optimizer.

  `state` and `batch` may be arrays or `jax.ShapeDtypeStruct`s; only their
  shapes are used. Returns (jitted step, state shardings, batch shardings).
  """
  check_batch(config, tc, jax.tree.leaves(batch)[0].shape, mesh)
  s_shard = state_shardings(state, mesh, tc.offload)
  b_shard = batch_shardings(batch, mesh)
  metric_shard = NamedSharding(mesh, P())
  if tc.offloads("optimizer"):
    return _offloaded_step(config, tc, mesh, s_shard, b_shard), s_shard, b_shard

  def step_fn(s, b):
    with activation_mesh(mesh):
      return train_step(s, b, config=config, tc=tc)

  step = jax.jit(
      step_fn,
      in_shardings=(s_shard, b_shard),
      out_shardings=(s_shard, metric_shard), donate_argnums=0)
  return step, s_shard, b_shard


def _offloaded_step(config, tc, mesh, s_shard, b_shard) -> OffloadedStep:
  trainable = _in_memory(s_shard.trainable, "device")
  moments = _in_memory(s_shard.opt_state, "device")

  def grads_fn(trainable, frozen, step, batch):
    with activation_mesh(mesh):
      return gradients(trainable, frozen, step, batch, config=config, tc=tc)

  def update_fn(step, masters, opt_state, grads):
    # In the program: XLA moves what is updated to the device and back.
    step, masters, opt_state = update(
        step, jax.device_put(masters, trainable),
        jax.device_put(opt_state, moments), grads, tc=tc)
    return (step, jax.device_put(masters, s_shard.trainable),
            jax.device_put(opt_state, s_shard.opt_state))

  return OffloadedStep(
      jax.jit(grads_fn, in_shardings=(trainable, s_shard.frozen,
                                      s_shard.step, b_shard),
              out_shardings=(trainable, NamedSharding(mesh, P())),
              donate_argnums=0),  # the gradients take the copy's buffers
      jax.jit(update_fn, in_shardings=(s_shard.step, s_shard.trainable,
                                       s_shard.opt_state, trainable),
              out_shardings=(s_shard.step, s_shard.trainable,
                             s_shard.opt_state),
              donate_argnums=(0, 1, 2)),
      trainable)


def lower_step(config: LlamaConfig, tc: TrainConfig, mesh: Mesh, *, ctx: int,
               mode: str = "lora+", batch_per_device: int = 1,
               dtype=jnp.bfloat16, quantize: str = "none"):
  """(lowered step, abstract state): the sharded train step of `config` and
  `tc` on `mesh` for `tc.accum` micro-batches of `batch_per_device` rows of
  `ctx` tokens per device, lowered against abstract arrays (nothing is
  allocated; `mesh` may hold compile-only devices). Weights in `dtype`;
  the layer kernels in 4 bits for `quantize="nf4"`."""
  params = jax.eval_shape(functools.partial(init_params, config, dtype=dtype),
                          jax.random.key(0))
  if quantize == "nf4":
    params = nf4.quantize_layers(params)
  state = jax.eval_shape(lambda p: initial_state(p, tc, mode=mode), params)
  rows = batch_per_device * batch_parallelism(mesh)
  batch = {"input_ids": jax.ShapeDtypeStruct((tc.accum, rows, ctx),
                                             jnp.int32)}
  step, s_shard, b_shard = jit_train_step(config, tc, mesh, state, batch)
  with_shardings = lambda tree, sh: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  # Under the mesh: jax >= 0.11 lowers a Pallas Triton kernel for the GPU
  # kind of the context mesh's devices (else of the default device, which
  # compiling for a GPU on a CPU host is not), also outside a shard_map.
  with jax.set_mesh(mesh):
    return step.lower(with_shardings(state, s_shard),
                      with_shardings(batch, b_shard)), state
