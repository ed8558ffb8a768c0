"""A run before it trains: its directory, its spec from the options, the
task's needs and a checkpoint's defaults (applied to that checkpoint's runs
only), and what a resumed run may change."""

import shutil
from pathlib import Path

import pytest

from longlora_jax.checkpoints import hub
from longlora_jax.checkpoints.checkpoint import Checkpoint
from longlora_jax.core.errors import LongLoraError
from longlora_jax.training import run
from longlora_jax.training.options import CheckpointDefaults, make_spec
from longlora_jax.training.recipe import write_spec
from longlora_jax.training.tasks import EXTEND, SFT


def _defaults(out=Path("runs/tiny"), made=None):
  made = [] if made is None else made
  return CheckpointDefaults(
      ckpt="demo", options={"ctx": 512, "steps": 7, "lr": 1e-3}, out=out,
      data=lambda: made.append(1) or "made.jsonl")


def test_run_directory():
  d = _defaults()
  assert run.run_directory({}, EXTEND, Path("o"), d) == Path("o")
  assert run.run_directory({}, EXTEND, None, d) == Path("runs/tiny")
  assert run.run_directory({"ckpt": "demo"}, EXTEND, None, d) == Path(
      "runs/tiny")
  assert run.run_directory(
      {"ckpt": "hf:meta-llama/Llama-2-7b-hf@main", "ctx": 8192}, EXTEND,
      None, d) == Path("runs/extend/Llama-2-7b-hf-8192")
  assert run.run_directory({"ckpt": "/models/llama/", "ctx": 64}, SFT,
                           None) == Path("runs/sft/llama-64")
  with pytest.raises(LongLoraError, match="^--ckpt is required: the model "
                     "to fine-tune, e.g. the merged model of a train.extend "
                     "run"):
    run.run_directory({}, SFT, None)


def test_a_checkpoints_defaults_fill_what_the_options_leave(tmp_path):
  made = []
  d = _defaults(made=made)
  spec, base = run.prepare({}, task=EXTEND, resume=False,
                           run_dir=tmp_path / "a", defaults=d)
  assert (spec.ckpt, spec.ctx, spec.recipe.steps, spec.recipe.lr,
          spec.data, spec.task) == ("demo", 512, 7, 1e-3, "made.jsonl", EXTEND)
  assert base.name == "demo" and made == [1]
  # The command line wins; data it names is not made.
  spec, _ = run.prepare({"ckpt": "demo", "steps": 3, "data": "mine.jsonl"},
                        task=EXTEND, resume=False, run_dir=tmp_path / "b",
                        defaults=d)
  assert (spec.ctx, spec.recipe.steps, spec.data) == (512, 3, "mine.jsonl")
  assert made == [1]


def test_another_checkpoint_takes_only_the_tasks_defaults(tmp_path):
  other = tmp_path / "other"
  shutil.copytree(hub.BUILTIN["demo"], other)
  with pytest.raises(LongLoraError, match="^--ctx is required: the context "
                     "to extend to, e.g. --ctx 1024$"):  # 4 x 256
    run.prepare({"ckpt": str(other)}, task=EXTEND, resume=False,
                run_dir=tmp_path / "a", defaults=_defaults())
  with pytest.raises(LongLoraError, match="^--ctx is required: the tokens "
                     "per training row$"):
    run.prepare({"ckpt": str(other)}, task=SFT, resume=False,
                run_dir=tmp_path / "a")
  spec, _ = run.prepare({"ckpt": str(other), "ctx": 512}, task=SFT,
                        resume=False, run_dir=tmp_path / "a",
                        defaults=_defaults())
  assert (spec.recipe.steps, spec.data) == (1000, "Yukang/LongAlpaca-12k")


def test_a_new_run_needs_a_directory_it_may_use(tmp_path, capsys):
  new = lambda run_dir, replaceable=False: run.prepare(
      {}, task=EXTEND, resume=False, run_dir=run_dir, defaults=_defaults(),
      replaceable=replaceable)
  user = tmp_path / "user"
  user.mkdir()
  (user / "notes.txt").write_text("mine")
  with pytest.raises(LongLoraError, match="is not empty; continue its run "
                     "with --resume, or choose another --out"):
    new(user)
  debris = tmp_path / "debris"  # a run killed before its first checkpoint
  (debris / "checkpoints" / "1.orbax-checkpoint-tmp").mkdir(parents=True)
  (debris / "run.json").write_text("{}")
  new(debris)
  assert "stopped before its first checkpoint" in capsys.readouterr().out
  done = tmp_path / "done"  # a finished run, in the defaults' directory
  (done / "checkpoints" / "5").mkdir(parents=True)
  (done / "run.json").write_text("{}")
  with pytest.raises(LongLoraError, match="is not empty"):
    new(done)
  new(done, replaceable=True)
  assert capsys.readouterr().out == ""


def test_a_resumed_run_keeps_its_task_and_recipe(tmp_path):
  base = Checkpoint.open("demo")
  saved = make_spec({"ckpt": "demo", "ctx": 512, "steps": 10}, task=SFT,
                    base_config=base.config.to_hf_dict())
  write_spec(tmp_path, saved)
  resume = lambda given, task=SFT: run.prepare(
      given, task=task, resume=True, run_dir=tmp_path)[0]
  with pytest.raises(LongLoraError, match=f"^{tmp_path} is a run of "
                     f"train.sft; resume it with python -m train.sft "
                     f"--resume --out {tmp_path}$"):
    resume({}, EXTEND)
  with pytest.raises(LongLoraError, match=r"^--batch 4 differs from this "
                     r"run's 1; a resumed run keeps its recipe \(only "
                     r"--steps, --lr, --save-every, --keep, --gguf can "
                     r"change\)$"):
    resume({"batch": 4})
  assert resume({}) == saved
  assert resume({"steps": 50}).recipe.steps == 50


def test_resume_without_a_directory_is_one_line():
  with pytest.raises(LongLoraError, match="^--resume continues the run in "
                     "--out: name its directory$"):
    run.run({}, task=SFT, resume=True)
