"""What goes wrong around a run, and what the commands then do: damaged
checkpoints, a full or read-only disk, bad numbers and token ids, debris of
failed runs, two runs on one directory. Each is one line, exit code 2, and
nothing lost (issue 20)."""

import json
import os
import re
import shutil
import time

import numpy as np
import pytest

from longlora_jax import LongLoraError
from longlora_jax.training import loop, saving
from tests.commands.test_extend import _args, _data, _metrics, _model
from tests.conftest import run_commands
from tests.core.test_lock import _holder
from train import export, extend

MODEL_FILES = ("hf/model.safetensors", "peft/adapter_model.safetensors")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("failures")
  files = {"model": _model(d / "model"), "data": _data(d / "docs.jsonl", 40),
           "tmp": d}
  # Uninterrupted references: 8 steps, and 6 steps saved every 2.
  files["whole"] = d / "whole"
  assert extend.main(_args(files, files["whole"], "--steps", "8")) == 0
  files["six"] = d / "six"
  assert extend.main(_args(files, files["six"], "--steps", "6", "--save-every",
                           "2", "--keep", "3")) == 0
  return files


def _same_model(a, b):
  for name in MODEL_FILES:
    assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _errors(text):
  return [line for line in text.splitlines()
          if line.startswith(("error:", "warning:"))]


def _halve_data_files(step_dir):
  for f in step_dir.glob("state/**/d/*"):
    with open(f, "r+b") as data:
      data.truncate(f.stat().st_size // 2)


def test_resume_passes_over_an_unreadable_newest_checkpoint(files, capfd):
  run = files["tmp"] / "damaged"
  shutil.copytree(files["six"], run)
  _halve_data_files(run / "checkpoints" / "6")
  (run / ".hf.partial-0badf00d").mkdir()  # An export a kill left behind.
  (run / ".hf.partial-0badf00d" / "model.safetensors").write_bytes(b"x" * 99)
  capfd.readouterr()
  assert extend.main(["--resume", "--out", str(run), "--steps", "8"]) == 0
  out, err = capfd.readouterr()
  (warning,) = _errors(err)
  assert re.fullmatch(
      rf"warning: {re.escape(str(run))}/checkpoints/6 is unreadable \(state/ "
      r"data truncated, emptied or missing \(.*OUT_OF_RANGE.*\)\); moved to "
      rf"{re.escape(str(run))}/checkpoints.unreadable; resuming from step 4",
      warning)
  assert "Traceback" not in err and "absl" not in err
  assert ("note: removed an unfinished write left by an interrupted run: "
          f"{run / '.hf.partial-0badf00d'} (") in out
  assert not list(run.glob(".*partial*"))
  # Kept aside, not deleted; the run went on from step 4 as if nothing had
  # happened: the same model as an uninterrupted run.
  assert (run / "checkpoints.unreadable" / "6" / "state").is_dir()
  assert saving.steps_in(run / "checkpoints") == [4, 6, 8]
  assert [m["step"] for m in _metrics(run)] == list(range(1, 9))
  _same_model(run, files["whole"])


def test_export_passes_over_it_or_names_it(files, capfd):
  run = files["tmp"] / "damaged_export"
  shutil.copytree(files["six"], run)
  (run / "checkpoints" / "6" / "state" / "_METADATA").write_text('{"tree_')
  capfd.readouterr()
  export.main(["--run", str(run), "--out", str(files["tmp"] / "export4")])
  out, err = capfd.readouterr()
  assert _errors(err) == [
      f"warning: {run}/checkpoints/6 is unreadable (state/_METADATA is not "
      "valid JSON, truncated or damaged (JSONDecodeError)); exporting step 4"]
  assert f"{run}: step 4 exported" in out and "absl" not in err
  assert (run / "checkpoints" / "6").is_dir()  # Left in place by a reader.
  with pytest.raises(LongLoraError) as error:
    export.main(["--run", str(run), "--step", "6", "--out",
                 str(files["tmp"] / "export6")])
  assert str(error.value) == (
      f"{run}/checkpoints/6 is unreadable (state/_METADATA is not valid "
      "JSON, truncated or damaged (JSONDecodeError)); readable steps: 2, 4")
  assert not (files["tmp"] / "export6").exists()


class _FillDiskAt:
  """A tqdm stand-in: after step `n`, once the saves before it are complete,
  it fills the file system of `fs` (a disk filling up mid-run), and it makes
  each step last longer than a save of this tiny model, as steps of real
  models do."""

  def __init__(self, n, fs):
    self.n, self.fs, self.tqdm = n, fs, loop.tqdm

  def _saves_done(self):
    names = os.listdir(self.fs / "run" / "checkpoints")
    return names and not any("tmp" in name for name in names)

  def __call__(self, *args, **kwargs):
    bar = self.tqdm(*args, **kwargs)
    update = bar.update

    def filling_update(k=1):
      update(k)
      if bar.n == self.n:
        while not self._saves_done():
          time.sleep(0.05)
        with open(self.fs / "filler", "wb", buffering=0) as f:
          try:
            while f.write(b"\0" * 4096):
              pass
          except OSError:  # Full.
            pass
      time.sleep(0.5)
    bar.update = filling_update
    return bar


def test_a_full_disk_stops_the_run_within_a_step(files, small_fs,
                                                 monkeypatch):
  # A real full file system (a tmpfs), filled after step 3; the next save
  # (step 4) fails in the background.
  fs = small_fs(4 << 20)
  run = fs / "run"
  monkeypatch.setattr(loop, "tqdm", _FillDiskAt(3, fs))
  with pytest.raises(LongLoraError) as error:
    extend.main(_args(files, run, "--steps", "8", "--save-every", "2",
                      "--keep", "10"))
  monkeypatch.undo()
  assert str(error.value) == (
      f"saving checkpoint {run}/checkpoints/4 failed (no space left on "
      f"device); training stopped; the last good checkpoint is "
      f"{run}/checkpoints/2: free space there or write elsewhere (another "
      "--out), then continue with --resume")
  # Noticed by the end of the step after, at the latest.
  assert [m["step"] for m in _metrics(run)] in ([1, 2, 3, 4], [1, 2, 3, 4, 5])
  assert sorted(os.listdir(run / "checkpoints")) == ["2"]
  # Nothing lost: with the space back, the run ends as if never stopped.
  (fs / "filler").unlink()
  assert extend.main(["--resume", "--out", str(run)]) == 0
  _same_model(run, files["whole"])


def test_too_little_space_for_two_checkpoints_is_refused_at_start(
    files, small_fs):
  fs = small_fs(200 << 10)
  free = shutil.disk_usage(fs).free
  with pytest.raises(LongLoraError) as error:
    extend.main(_args(files, fs / "run", "--steps", "8"))
  # Float32 LoRA r8 on q, k, v, o (2 layers, 32 wide), the embedding
  # (259 x 32) and the norms, times 3 with AdamW's moments, plus three
  # int32 counters: 150,540 bytes.
  assert 3 * 4 * (4 * 2 * 2 * 32 * 8 + 259 * 32 + 2 * 2 * 32 + 32) + 12 == (
      150540)
  message = str(error.value)
  assert re.fullmatch(
      rf"{re.escape(str(fs))}/run: (\d+\.\d) KiB free, but a checkpoint of "
      r"this run takes about 147\.0 KiB and a run holds two while it saves; "
      r"free space there or write elsewhere \(another --out\)", message)
  # What was free then (its lock file's block aside).
  assert free - 8192 <= float(message.split(": ")[1].split()[0]) * 1024 <= free
  assert list(fs.iterdir()) == []


def test_a_failure_before_the_first_checkpoint_leaves_nothing(files, capfd):
  run = files["tmp"] / "nan_early"
  with pytest.raises(LongLoraError, match="no checkpoint was saved before"):
    extend.main(_args(files, run, "--lr", "1e30", "--warmup", "0",
                      "--steps", "5", "--save-every", "10"))
  assert not run.exists()
  # Debris of one killed before its first checkpoint (SIGKILL: no cleanup)
  # does not block the same command: it starts afresh, with a note.
  run.mkdir()
  (run / "run.json").write_text("{}")
  (run / "metrics.jsonl").write_text('{"step": 1}\n')
  (run / "checkpoints" / "1.orbax-checkpoint-tmp").mkdir(parents=True)
  capfd.readouterr()
  assert extend.main(_args(files, run, "--steps", "2")) == 0
  assert (f"note: {run} holds a run that stopped before its first "
          "checkpoint (nothing to resume); starting afresh"
          in capfd.readouterr().out)
  assert [m["step"] for m in _metrics(run)] == [1, 2]


def test_resume_with_fewer_steps_than_done_is_refused(files):
  before = sorted(p.relative_to(files["six"]) for p in
                  files["six"].rglob("*"))
  with pytest.raises(LongLoraError) as error:
    extend.main(["--resume", "--out", str(files["six"]), "--steps", "5"])
  assert str(error.value) == (
      f"--steps 5 is below step 6, where this run is (its newest "
      f"checkpoint); pass --steps 6 or more, or export an earlier checkpoint "
      f"with python -m train.export --run {files['six']} --step N")
  assert sorted(p.relative_to(files["six"]) for p in
                files["six"].rglob("*")) == before
  assert json.loads((files["six"] / "run.json").read_text())["recipe"][
      "steps"] == 6


def test_a_second_run_on_one_directory_is_refused(files):
  holder = _holder(files["six"])
  try:
    for args in (["--resume", "--out", str(files["six"])],
                 _args(files, files["six"], "--steps", "9")):
      with pytest.raises(LongLoraError) as error:
        extend.main(args)
      assert str(error.value).startswith(
          f"{files['six']} is in use by another run (pid {holder.pid} on ")
  finally:
    holder.kill()
    holder.wait()


@pytest.mark.parametrize("command,args,message", [
    # --seq-len -5 used to hang, 0 and --num-tests 0 to divide by zero.
    ("eval.perplexity", ["--ckpt", "M", "--data", "D", "--seq-len", "-5"],
     "argument --seq-len: '-5' is not an integer >= 2 (e.g. 4096 or "
     "4k)"),
    ("eval.perplexity", ["--ckpt", "M", "--data", "D", "--seq-len", "0"],
     "argument --seq-len: '0' is not an integer >= 2 (e.g. 4096 or "
     "4k)"),
    ("eval.passkey", ["--ckpt", "M", "--num-tests", "0"],
     "argument --num-tests: '0' is not an integer >= 1"),
    ("eval.chat", ["--ckpt", "M", "--material", "D", "--question", "?",
                   "--top-p", "0"],
     "argument --top-p: '0' is not a finite number in (0, 1]"),
    ("train.export", ["--run", "D", "--out", "D", "--step", "-1"],
     "argument --step: '-1' is not an integer >= 0"),
    # Used to train to "loss nan at step 1/2", or silently (gradient ascent).
    ("train.extend", ["--lr", "nan"],
     "argument --lr: 'nan' is not a finite number > 0"),
    ("train.extend", ["--lr", "inf"],
     "argument --lr: 'inf' is not a finite number > 0"),
    ("train.extend", ["--lr", "-1"],
     "argument --lr: '-1' is not a finite number > 0"),
    ("train.extend", ["--lora-alpha", "nan"],
     "argument --lora-alpha: 'nan' is not a finite number > 0"),
    ("train.extend", ["--warmup", "-5"],
     "argument --warmup: '-5' is not an integer >= 0"),
    ("train.sft", ["--beta2", "1"],
     "argument --beta2: '1' is not a finite number in [0, 1)"),
    ("bench.host_memory", ["--ckpt", "M", "--out", "D",
                                "--max-shard-size", "5XB"],
     "argument --max-shard-size: '5XB' is not a size in bytes or e.g. 5GB "
     "or 500MB"),
])
def test_numbers_are_checked_at_the_door(command, args, message, capsys):
  import importlib
  main = importlib.import_module(command).main
  with pytest.raises(SystemExit) as exit_:
    main(args)
  assert exit_.value.code == 2
  assert capsys.readouterr().err == f"error: {message} (see --help)\n"


def test_misleading_messages_now_name_the_fix(files, tmp_path):
  with pytest.raises(LongLoraError) as error:
    extend.main(_args(files, tmp_path / "ratio", "--group-ratio", "0.3"))
  assert str(error.value) == (
      "--ctx 64 does not split into S²-Attn groups of 0.3 x ctx tokens (an "
      "even group size that divides the context); no context near it does; "
      "use --group-ratio 0.25 or 0.5")
  from eval import chat
  with pytest.raises(LongLoraError, match=f"--material {tmp_path}: is a "
                     "directory; pass a .txt file"):
    chat.main(["--ckpt", "x", "--material", str(tmp_path), "--question", "?"])
  assert list(tmp_path.iterdir()) == []


def test_bad_files_are_one_line_exit_2_and_write_nothing(files,
                                                         read_only_dir):
  tmp = files["tmp"] / "bad"
  tmp.mkdir()
  ids = np.random.default_rng(0).integers(3, 259, 5000)
  ids[3000] = 300
  np.save(tmp / "big.npy", ids)
  ids[3000], ids[1234] = 5, -1
  np.save(tmp / "negative.npy", ids.astype(np.int32))
  model, data = str(files["model"]), str(files["data"])
  ro = lambda name: str(read_only_dir / name)
  cannot = "cannot write there ("
  cases = {
      # A read-only --out, found before any work: the missing data or
      # checkpoint would fail first otherwise.
      "ro_extend": (("train.extend", ["--ckpt", model, "--ctx", "64",
                                      "--data", "/nope.jsonl", "--out",
                                      ro("run")]),
                    f"{read_only_dir}/run: {cannot}"),
      "ro_export": (("train.export", ["--run", str(files["six"]), "--out",
                                      ro("hf")]),
                    f"{read_only_dir}/hf: {cannot}"),
      "ro_passkey": (("eval.passkey", ["--ckpt", "/nope", "--out",
                                       ro("pk")]),
                     f"{read_only_dir}/pk: {cannot}"),
      "ro_perplexity": (("eval.perplexity", ["--ckpt", "/nope", "--data",
                                             data, "--out", ro("ppl")]),
                        f"{read_only_dir}/ppl: {cannot}"),
      "ro_ruler": (("eval.ruler", ["--ckpt", "/nope", "--out",
                                   ro("ruler")]),
                   f"{read_only_dir}/ruler: {cannot}"),
      "ro_tokenize": (("eval.pretokenize", ["--tokenizer", model, "--data",
                                         data, "--out", ro("t.bin")]),
                      f"{read_only_dir}: {cannot}"),
      # Token ids outside the vocabulary (259), before anything runs.
      "vocab_big": (("train.extend", ["--ckpt", model, "--ctx", "64",
                                      "--data", str(tmp / "big.npy"),
                                      "--out", str(tmp / "out")]),
                    f"{tmp}/big.npy: token id 300 at position 3,000 is "
                    "outside the model's vocabulary of 259 (ids 0 to 258); "
                    "tokenize the data with this model's tokenizer (python "
                    "-m eval.pretokenize)"),
      "vocab_negative": (("eval.perplexity", [
          "--ckpt", model, "--data", str(tmp / "negative.npy"), "--out",
          str(tmp / "ppl")]),
                         f"{tmp}/negative.npy: token id -1 at position 1,234 "
                         "is outside the model's vocabulary of 259"),
  }
  results = run_commands({name: command
                          for name, (command, _) in cases.items()})
  for name, (_, message) in cases.items():
    code, stderr = results[name]
    assert code == 2, (name, stderr)
    # One error line and no traceback; other lines are the environment's
    # (transformers says "PyTorch was not found" where torch is absent).
    lines = _errors(stderr)
    assert "Traceback" not in stderr, (name, stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), (
        name, stderr)
  assert sorted(os.listdir(tmp)) == ["big.npy", "negative.npy"]
  assert list(read_only_dir.iterdir()) == []


def test_damaged_data_is_one_line_and_creates_nothing(tmp_path):
  # As a new user meets them: a Parquet file whose footer is cut off, a JSON
  # array cut short; each names the file, and no run directory is made.
  import pyarrow as pa
  import pyarrow.parquet as pq
  parquet = tmp_path / "train.parquet"
  pq.write_table(pa.table({"text": ["the sky is blue"] * 50}), parquet)
  parquet.write_bytes(parquet.read_bytes()[:-3])
  truncated = tmp_path / "train.json"
  truncated.write_text(json.dumps([{"text": "the grass is green"}] * 20)[:-30])
  cases = {"parquet": (parquet, r"not a readable Parquet file \(Parquet "
                       r"magic bytes not found in footer"),
           "json": (truncated, r"not valid JSON at line 1, column \d+ "
                    r"\(byte \d+\): ")}
  results = run_commands({name: ("train.extend", [
      "--data", str(path), "--steps", "1", "--out", str(tmp_path / name)])
                          for name, (path, _) in cases.items()})
  for name, (path, message) in cases.items():
    code, stderr = results[name]
    assert code == 2, (name, stderr)
    # One error line and no traceback; other lines are the environment's
    # (transformers says "PyTorch was not found" where torch is absent).
    lines = _errors(stderr)
    assert "Traceback" not in stderr, (name, stderr)
    assert len(lines) == 1 and re.match(
        rf"error: {re.escape(str(path))}: {message}.*; fix or remove the "
        "file$", lines[0]), (name, stderr)
    assert not (tmp_path / name).exists(), name
