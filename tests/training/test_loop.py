"""The loop around a train step (here a stand-in with set losses): what it
logs per step, when it saves and what with, the NaN stop naming the last
good checkpoint, a signal that stops it after the step, and the metrics
file a resumed run rewrites."""

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax.core.errors import LongLoraError
from longlora_jax.data.text import Position
from longlora_jax.model.config import LlamaConfig
from longlora_jax.parallel.sharding import make_mesh
from longlora_jax.training import loop
from longlora_jax.training.recipe import RunSpec, TrainConfig

# 1 row a device x 2 micro-batches x 8 tokens: 16 tokens a step.
SPEC = RunSpec(ckpt="m", ctx=8, base_config={}, batch=1, save_every=2,
               recipe=TrainConfig(accum=2, steps=5))


@dataclasses.dataclass
class _State:
  step: int
  trainable: dict


class _Writer:
  """saving.Writer's interface: a save is good once polled."""

  def __init__(self, directory):
    self.mngr = type("M", (), {"directory": directory})()
    self.good = self.pending = None
    self.saves = []

  def save(self, state, record):
    self.poll()
    self.saves.append((int(state.step), record))
    self.pending = int(state.step)

  def poll(self, wait=False):
    if self.pending is not None:
      self.good, self.pending = self.pending, None


def _batches(n):
  """(batch [accum, rows, ctx] of the step's number, position) pairs."""
  return [({"input_ids": np.full((2, 1, 8), i, np.int64)},
           Position(doc=i)) for i in range(1, n + 1)]


def _run(tmp_path, losses, *, start=0, weights=None, on_step=None):
  seen = []

  def step_fn(state, batch):
    seen.append(int(batch["input_ids"][0, 0, 0]))
    step = int(state.step) + 1
    if on_step:
      on_step(step)
    trainable = {"w": jnp.asarray((weights or {}).get(step, 1.0))}
    return _State(step, trainable), {"loss": jnp.asarray(losses[step - 1]),
                                     "grad_norm": jnp.asarray(0.5)}

  mesh = make_mesh("fsdp=1", jax.devices()[:1])
  shard = {"input_ids": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
  data = iter(_batches(5)[start:])
  writer = _Writer(tmp_path / "checkpoints")
  state, signum = loop.loop(
      SPEC, LlamaConfig(hidden_size=64, num_attention_heads=4,
                        num_hidden_layers=1, vocab_size=64),
      mesh, _State(start, {"w": jnp.ones(())}), step_fn, shard, next(data),
      data, writer, tmp_path)
  return state, signum, writer, seen


def test_steps_log_and_save_on_schedule(tmp_path):
  state, signum, writer, seen = _run(tmp_path, [5.0, 4.0, 3.0, 2.0, 1.0])
  assert (state.step, signum, seen) == (5, None, [1, 2, 3, 4, 5])
  metrics = loop.read_metrics(tmp_path)
  assert [(m["step"], m["loss"]) for m in metrics] == [
      (1, 5.0), (2, 4.0), (3, 3.0), (4, 2.0), (5, 1.0)]
  for m in metrics:
    assert m["tokens_per_s"] * m["step_seconds"] == pytest.approx(16)
  # Every --save-every 2 steps and at the end, each with the position after
  # its batch and its loss.
  assert writer.saves == [
      (2, {"data": dataclasses.asdict(Position(doc=2)), "loss": 4.0}),
      (4, {"data": dataclasses.asdict(Position(doc=4)), "loss": 2.0}),
      (5, {"data": dataclasses.asdict(Position(doc=5)), "loss": 1.0})]


def test_a_resumed_loop_runs_the_steps_left(tmp_path):
  state, _, writer, seen = _run(tmp_path, [9, 9, 3.0, 2.0, 1.0], start=2)
  assert state.step == 5 and seen == [3, 4, 5]
  assert [m["step"] for m in loop.read_metrics(tmp_path)] == [3, 4, 5]
  assert [s for s, _ in writer.saves] == [4, 5]


def test_a_nan_loss_stops_at_its_step_naming_the_last_good_checkpoint(
    tmp_path):
  with pytest.raises(LongLoraError) as error:
    _run(tmp_path, [5.0, 4.0, float("nan"), 2.0, 1.0])
  assert str(error.value) == (
      f"loss nan (grad norm 0.5) at step 3: training stopped; the last good "
      f"checkpoint is step 2 in {tmp_path / 'checkpoints'} (continue from it "
      "with --resume, e.g. with a lower --lr)")
  assert [m["step"] for m in loop.read_metrics(tmp_path)] == [1, 2]


def test_nan_weights_are_never_saved(tmp_path):
  # A finite loss, but step 2's weights overflowed: its save is refused.
  with pytest.raises(LongLoraError, match="at step 2: training stopped; no "
                     "checkpoint was saved before it"):
    _run(tmp_path, [5.0, 4.0, 3.0, 2.0, 1.0], weights={2: float("inf")})


def test_a_signal_stops_after_the_step_with_a_save(tmp_path):
  send = lambda step: step == 3 and os.kill(os.getpid(), signal.SIGTERM)
  state, signum, writer, seen = _run(tmp_path, [5.0, 4.0, 3.0, 2.0, 1.0],
                                     on_step=send)
  assert (state.step, signum, seen) == (3, signal.SIGTERM, [1, 2, 3])
  assert [s for s, _ in writer.saves] == [2, 3]
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored


def test_metrics_after_a_step_are_dropped_and_plotted(tmp_path):
  (tmp_path / loop.METRICS_FILE).write_text("".join(
      json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)))
  loop.truncate_metrics(tmp_path, 3)
  assert [m["step"] for m in loop.read_metrics(tmp_path)] == [1, 2, 3]
  loop.truncate_metrics(tmp_path / "none", 3)  # no file: nothing to do
  loop.plot_loss(tmp_path, SPEC)
  assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
