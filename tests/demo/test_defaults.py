"""The demo's defaults: the recipe the README states for `python -m
train.extend` with no arguments, on the standard library's training split,
into runs/demo/extend."""

from pathlib import Path

from longlora_jax.checkpoints import hub
from longlora_jax.demo import defaults, stdlib
from longlora_jax.training.options import make_spec
from longlora_jax.training.tasks import EXTEND


def test_the_demo_extends_the_builtin_model_to_1024_tokens(monkeypatch):
  d = defaults.EXTEND
  assert hub.resolve_checkpoint(d.ckpt) == hub.BUILTIN["demo"]
  assert d.out == Path("runs/demo/extend")
  spec = make_spec({**d.options, "ckpt": d.ckpt}, task=EXTEND,
                   base_config={})
  r = spec.recipe
  assert (spec.ctx, spec.batch, r.steps, r.accum, r.lr, r.dtype,
          r.remat) == (1024, 8, 200, 1, 2e-3, "float32", "none")
  # What it does not set is the official recipe's.
  assert (r.warmup, spec.lora_rank, r.attention.group_ratio) == (20, 8, 0.25)


def test_its_data_is_the_training_split(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(stdlib, "demo_data", lambda: calls.append(1) or (
      tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"))
  assert defaults.EXTEND.data() == str(tmp_path / "train.jsonl")
  assert calls == [1]
