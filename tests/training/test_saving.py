import re
import shutil
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.futures import future as commit_future

from longlora_jax import CheckpointError, LlamaConfig, LongLoraError, init_params
from longlora_jax.model import lora
from longlora_jax.attention.dispatch import AttentionSpec
from longlora_jax.parallel.sharding import make_mesh
from longlora_jax.training import saving
from longlora_jax.training.recipe import TrainConfig
from longlora_jax.training.step import init_state, jit_train_step, params_of

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4)
TC = TrainConfig(attention=AttentionSpec("full", implementation="dense"),
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


def _three_checkpoints(directory):
  mesh = make_mesh("fsdp=8")
  state, step, b_shard, batch = _steps(_state(), 1, mesh)
  mngr = saving.manager(directory, keep=3)
  for i in range(3):
    saving.save(mngr, state, {"data": {"doc": i}, "loss": 1.5})
    state, _ = step(state, jax.device_put(batch, b_shard))
  mngr.wait_until_finished()
  mngr.close()
  return state


def _truncate(path, size):
  with open(path, "r+b") as f:
    f.truncate(size)


# Real damage on disk, as the issue made it: data files cut in half or
# emptied, the arrays' _METADATA cut short, a data file deleted.
DAMAGE = {
    "halved": (lambda d: [_truncate(f, f.stat().st_size // 2) for f in
                          d.glob("state/**/d/*")],
               r"state/ data truncated, emptied or missing \(.*OUT_OF_RANGE"),
    "emptied": (lambda d: [_truncate(f, 0) for f in
                           d.glob("state/**/d/*")],
                r"state/ data truncated, emptied or missing \(.*OUT_OF_RANGE"
                r".* value of size 0\)"),
    "metadata": (lambda d: _truncate(d / "state" / "_METADATA", 50),
                 r"state/_METADATA is not valid JSON, truncated or damaged "
                 r"\(JSONDecodeError\)"),
    "deleted": (lambda d: [f.unlink() for f in
                           d.glob("state/**/d/*")],
                r"state/ data truncated, emptied or missing \(.*NOT_FOUND"),
}


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
  directory = tmp_path_factory.mktemp("saved") / "checkpoints"
  _three_checkpoints(directory)
  return directory


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_set_aside(tmp_path, damage,
                                                     three_checkpoints):
  directory = tmp_path / "checkpoints"
  shutil.copytree(three_checkpoints, directory)
  assert saving.steps_in(directory) == [1, 2, 3]
  assert all(saving.unreadable(directory / str(s)) is None for s in (1, 2, 3))
  harm, why = DAMAGE[damage]
  harm(directory / "3")
  assert re.match(why, saving.unreadable(directory / "3"))
  step, bad = saving.newest_readable(directory)
  assert step == 2 and list(bad) == [3]
  aside = saving.set_aside(directory, bad)
  assert aside == tmp_path / saving.UNREADABLE
  assert saving.steps_in(directory) == [1, 2]
  assert (aside / "3" / "state").is_dir()  # Kept, not deleted.
  # What is left restores (through Orbax, as a resumed run does).
  mngr = saving.manager(directory, read_only=True)
  restored, record = saving.restore(mngr, 2, _state())
  assert record["data"] == {"doc": 1} and int(restored.step) == 2
  mngr.close()


def test_checkpoint_bytes_counts_what_is_saved():
  state = _state(rank=4)
  # Trainable (float32): LoRA a [2, 32, 4] and b [2, 4, 32] on q, k, v, o,
  # the embedding [64, 32], two norms [2, 32] per layer and the final one.
  trainable = 4 * (2 * 32 * 4 + 2 * 4 * 32) + 64 * 32 + 2 * 2 * 32 + 32
  assert sum(x.size for x in jax.tree.leaves(state.trainable)) == trainable
  # AdamW's mu and nu of the same, its step count and the learning-rate
  # schedule's (int32), and the state's step.
  assert saving.checkpoint_bytes(state) == 4 * 3 * trainable + 3 * 4
  assert saving.checkpoint_bytes(jax.eval_shape(lambda: state)) == (
      saving.checkpoint_bytes(state))


class _FailingSave:
  """Stands for a CheckpointManager whose background write failed: the
  error is TensorStore's, verbatim (simulated ENOSPC; the real full file
  system is in test_a_full_disk_stops_the_writer)."""
  directory = "/runs/x/checkpoints"

  def __init__(self):
    self.saved = []

  def save(self, step, **kwargs):
    self.saved.append(step)

  def is_saving_in_progress(self):
    return False

  def wait_until_finished(self):
    if len(self.saved) == 2:
      raise ValueError(
          "RESOURCE_EXHAUSTED: Error writing local file \"/runs/x/"
          "checkpoints/8.orbax-checkpoint-tmp/state/_sharding\": Failed to "
          "write 12996 bytes to file 5: No space left on device "
          "[os_error_code='28']")

  def close(self):
    pass


def test_a_failed_background_save_is_reported_at_the_next_poll():
  writer = saving.Writer(_FailingSave(), last_good=4)
  state = _state()
  writer.save(state.replace(step=jnp.asarray(6)), {})
  writer.poll()
  assert (writer.good, writer.pending) == (6, None)
  writer.save(state.replace(step=jnp.asarray(8)), {})
  with pytest.raises(LongLoraError) as error:
    writer.poll()
  assert str(error.value) == (
      "saving checkpoint /runs/x/checkpoints/8 failed (no space left on "
      "device); training stopped; the last good checkpoint is "
      "/runs/x/checkpoints/6: free space there or write elsewhere (another "
      "--out), then continue with --resume")


def test_closing_reports_a_last_save_that_failed():
  writer = saving.Writer(_FailingSave(), last_good=None)
  state = _state()
  writer.save(state.replace(step=jnp.asarray(6)), {})
  writer.save(state.replace(step=jnp.asarray(8)), {})
  with pytest.raises(LongLoraError) as error:
    writer.close()
  assert str(error.value).startswith(
      "saving checkpoint /runs/x/checkpoints/8 failed (no space left on "
      "device); training stopped; the last good checkpoint is "
      "/runs/x/checkpoints/6: ")


class _LateWriteSave:
  """Stands for a CheckpointManager whose save wrote two items on two
  orbax commit threads: the first failed, and orbax reported it while the
  second was still writing into the temporary directory."""

  def __init__(self, directory):
    self.directory = directory

  def save(self, step, **kwargs):
    tmp = self.directory / f"{step}.orbax-checkpoint-tmp"
    tmp.mkdir(parents=True)

    async def record():
      self.failed.wait()
      time.sleep(0.2)  # Still writing when the writer cleans up.
      (tmp / "record").mkdir(parents=True, exist_ok=True)
      (tmp / "record" / "metadata").write_text("{}")

    self.failed = threading.Event()
    self.late = commit_future.CommitFuture(record(), name="late_record")

  def is_saving_in_progress(self):
    return False

  def wait_until_finished(self):
    self.failed.set()
    raise OSError(28, "No space left on device")

  def close(self):
    self.wait_until_finished()


def test_a_failed_save_leaves_no_temporary_directory(tmp_path):
  writer = saving.Writer(_LateWriteSave(tmp_path), last_good=None)
  with pytest.raises(LongLoraError, match="no space left on device"):
    writer.save(_state().replace(step=jnp.asarray(3)), {})
    writer.poll(wait=True)
  writer.close(failed=True)
  writer.mngr.late.result()  # Once every write has stopped:
  assert list(tmp_path.iterdir()) == []


def test_a_full_disk_stops_the_writer(small_fs):
  # A real full file system: room for one checkpoint of this state.
  fs = small_fs(1024 * 1024)
  mesh = make_mesh("fsdp=8")
  state, step, b_shard, batch = _steps(_state(), 1, mesh)
  writer = saving.Writer(saving.manager(fs / "checkpoints", keep=10), None)
  with pytest.raises(LongLoraError) as error:
    for _ in range(20):
      writer.save(state, {})
      writer.poll(wait=True)
      state, _ = step(state, jax.device_put(batch, b_shard))
  writer.close(failed=True)
  good = saving.steps_in(fs / "checkpoints")
  assert good and good == list(range(1, good[-1] + 1))
  assert str(error.value) == (
      f"saving checkpoint {fs}/checkpoints/{good[-1] + 1} failed (no space "
      f"left on device); training stopped; the last good checkpoint is "
      f"{fs}/checkpoints/{good[-1]}: free space there or write elsewhere "
      "(another --out), then continue with --resume")
  # The half-written one is gone; the good ones read completely.
  assert sorted(p.name for p in (fs / "checkpoints").iterdir()) == [
      str(s) for s in good]
  assert all(saving.unreadable(fs / "checkpoints" / str(s)) is None
             for s in good)
