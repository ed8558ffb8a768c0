"""The training loop of a run: steps, progress, metrics, checkpoints,
interrupts and the NaN stop.

Each step's metrics go to metrics.jsonl (and TensorBoard when installed)
and the progress bar; SIGINT/SIGTERM save a checkpoint after the current
step and stop; a non-finite loss or gradient, or a checkpoint that could not
be written, stops the run, naming the last good checkpoint.
"""

import dataclasses
import importlib
import json
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from longlora_jax.parallel.distributed import global_batch, process_slice
from longlora_jax.core.errors import LongLoraError
from longlora_jax.model.flops import peak_flops, step_flops
from longlora_jax.core.files import atomic_path, reported
from longlora_jax.core.plots import save_plot
from longlora_jax.parallel.sharding import batch_parallelism
from longlora_jax.training import saving
from longlora_jax.training.recipe import RunSpec, group_size
from longlora_jax.training.step import on_device

METRICS_FILE = "metrics.jsonl"


class _Interrupt:
  """SIGINT/SIGTERM set a flag the loop checks after each step."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGINT, signal.SIGTERM):
      self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signum is not None:  # A second signal: stop now.
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc):
    for s, handler in self._old.items():
      signal.signal(s, handler)


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x))
                              for x in jax.tree.leaves(tree)]))


def _tensorboard(directory: Path):
  """A SummaryWriter when TensorBoard is installed, else None."""
  for module in ("tensorboardX", "torch.utils.tensorboard"):
    try:
      return importlib.import_module(module).SummaryWriter(str(directory))
    except ImportError:
      continue
  return None


def loop(spec: RunSpec, config, mesh, state, step_fn, b_shard, first, data,
         writer: saving.Writer, run_dir: Path):
  """Steps to `spec.recipe.steps` from `state` (its step), the first batch
  `first` and then `data`, saving with `writer` (whose saves are checked
  after every step); (state, the signal that stopped it or None)."""
  steps = spec.recipe.steps
  rows = spec.batch * batch_parallelism(mesh)
  tokens_per_step = rows * spec.recipe.accum * spec.ctx
  local = process_slice(rows)
  main_process = jax.process_index() == 0
  flops = step_flops(config, spec.ctx, batch=rows * spec.recipe.accum,
                     group_size=group_size(spec))
  peak = peak_flops(jax.devices()[0])
  tb = _tensorboard(run_dir / "tensorboard") if main_process else None
  log = open(run_dir / METRICS_FILE, "a") if main_process else None
  first_step = int(state.step)
  # The bar says when the step moves state to the host (slower steps).
  offload = " (offload)" if spec.recipe.offload != "none" else ""
  bar = tqdm(total=steps, initial=first_step, desc=spec.task.name + offload,
             unit="step", disable=not main_process)
  batch, position = first
  tick = time.time()
  try:
    with _Interrupt() as interrupt:
      for i in range(first_step, steps):
        if i > first_step:
          batch, position = next(data)
        batch = {k: v[:, local].astype(np.int32) for k, v in batch.items()}
        state, metrics = step_fn(state, (
            global_batch(batch, b_shard, rows) if jax.process_count() > 1
            else jax.device_put(batch, b_shard)))
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        step, seconds, tick = i + 1, now - tick, now
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
          _stop_on_nan(writer, step, m)
        # Every token of every row is computed; "tokens" counts the scored.
        m.update(step=step, step_seconds=seconds,
                 tokens_per_s=tokens_per_step / seconds)
        if peak:
          m["mfu"] = flops / seconds / (peak * mesh.size)
        if log is not None:
          with reported(run_dir / METRICS_FILE):
            log.write(json.dumps(m) + "\n")
            log.flush()
        if tb is not None:
          for k, v in m.items():
            tb.add_scalar(f"train/{k}", v, step)
        bar.set_postfix(loss=f"{m['loss']:.4f}",
                        tok_s=f"{m['tokens_per_s']:,.0f}",
                        **({"mfu": f"{m['mfu']:.1%}"} if peak else {}))
        bar.update(1)
        stop = interrupt.signum is not None
        writer.poll()
        if step % spec.save_every == 0 or step == steps or stop:
          if not bool(_all_finite(on_device(state.trainable))):
            _stop_on_nan(writer, step, m)
          writer.save(state, {"data": dataclasses.asdict(position),
                              "loss": m["loss"]})
        if stop:
          return state, interrupt.signum
  finally:
    bar.close()
    if log is not None:
      log.close()
    if tb is not None:
      tb.close()
  return state, None


def _stop_on_nan(writer: saving.Writer, step, m):
  writer.poll(wait=True)
  kept = (f"the last good checkpoint is step {writer.good} in "
          f"{writer.mngr.directory} (continue from it with --resume, e.g. "
          "with a lower --lr)" if writer.good is not None else
          "no checkpoint was saved before it")
  raise LongLoraError(f"loss {m['loss']} (grad norm {m['grad_norm']}) at "
                      f"step {step}: training stopped; {kept}")


def read_metrics(run_dir: Path) -> list[dict]:
  file = run_dir / METRICS_FILE
  if not file.exists():
    return []
  return [json.loads(line) for line in file.read_text().splitlines()
          if line.strip()]


def truncate_metrics(run_dir: Path, step: int) -> None:
  """Drops logged steps after `step` (a resumed run logs them again)."""
  if not (run_dir / METRICS_FILE).exists():
    return
  kept = [m for m in read_metrics(run_dir) if m["step"] <= step]
  with atomic_path(run_dir / METRICS_FILE) as tmp:
    tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))


def plot_loss(run_dir: Path, spec: RunSpec) -> None:
  """loss.png: the training loss per step, from metrics.jsonl."""
  metrics = read_metrics(run_dir)
  if metrics:
    save_plot(run_dir / "loss.png", [m["step"] for m in metrics],
              [m["loss"] for m in metrics], xlabel="step",
              ylabel="loss (nats/token)", marker=None,
              title=f"{Path(spec.ckpt).name} -> {spec.ctx} tokens "
                    f"({spec.task.name})")
