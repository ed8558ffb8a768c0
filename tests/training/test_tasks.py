"""The two tasks: their RoPE rule, the contexts they take, what their rows
hold, and their names in run.json, against hand-computed values."""

import json
import re

import numpy as np
import pytest

from longlora_jax.checkpoints.checkpoint import Checkpoint
from longlora_jax.core.errors import LongLoraError
from longlora_jax.data.text import Position
from longlora_jax.model.config import LlamaConfig, RopeScaling
from longlora_jax.training import recipe
from longlora_jax.training.recipe import RunSpec, check_attention, check_ctx
from longlora_jax.training.tasks import EXTEND, SFT, TASKS, named

BASE = LlamaConfig(max_position_embeddings=32)  # 32 tokens
EXTENDED = LlamaConfig(max_position_embeddings=32,
                       rope_scaling=RopeScaling(4.0))  # 128 tokens


def _spec(task, ctx, **kw):
  return RunSpec(ckpt="x", ctx=ctx, base_config={}, task=task, **kw)


def test_extension_sets_the_factor_the_official_code_computes():
  # ceil(ctx / 32), whatever factor the checkpoint had.
  assert EXTEND.target_config(BASE, 100).rope_factor == 4.0
  assert EXTEND.target_config(BASE, 100).rope_type == "linear"
  assert EXTEND.target_config(EXTENDED, 64).rope_factor == 2.0
  assert EXTEND.target_config(BASE, 100, "yarn").rope_type == "yarn"


def test_fine_tuning_keeps_a_long_enough_model_and_raises_a_short_one():
  assert SFT.target_config(EXTENDED, 100) is EXTENDED
  assert SFT.target_config(EXTENDED, 200).rope_factor == 7.0  # ceil(200/32)
  assert SFT.target_config(BASE, 32) is BASE
  assert SFT.target_config(BASE, 33).rope_factor == 2.0


def test_only_extension_needs_a_longer_context():
  with pytest.raises(LongLoraError, match="--ctx 32 is not larger than the "
                     "checkpoint's context of 32 tokens"):
    check_ctx(_spec(EXTEND, 32), BASE)
  check_ctx(_spec(SFT, 32), BASE)
  # 36 does not split into groups of 9 (odd): the nearest valid contexts
  # are the even multiples of 8 around it, for extension above 32 only.
  with pytest.raises(LongLoraError, match="nearest valid: 40$"):
    check_ctx(_spec(EXTEND, 36), BASE)
  with pytest.raises(LongLoraError, match="nearest valid: 32 or 40$"):
    check_ctx(_spec(SFT, 36), BASE)


def test_fused_kernels_cannot_keep_packed_examples_apart(monkeypatch):
  monkeypatch.setattr(recipe, "on_nvidia_gpu", lambda _: True)
  config = LlamaConfig(hidden_size=512, num_attention_heads=4)  # head_dim 128
  spec = lambda task: _spec(task, 64, recipe=recipe.TrainConfig(
      attention=recipe.AttentionSpec(implementation="pallas")))
  with pytest.raises(LongLoraError, match="--s2-impl pallas cannot keep the "
                     "packed examples of train.sft apart"):
    check_attention(spec(SFT), config)
  check_attention(spec(EXTEND), config)
  # The ablation's groups without the shift run by the reshapes only.
  unshifted = _spec(EXTEND, 64, recipe=recipe.TrainConfig(
      attention=recipe.AttentionSpec(variant="none",
                                     implementation="cudnn")))
  with pytest.raises(LongLoraError, match="--s2-variant none runs by "
                     "--s2-impl dense or chunked$"):
    check_attention(unshifted, config)


def test_by_group_refused_before_loading_where_the_model_cannot():
  by_group = _spec(EXTEND, 64, recipe=recipe.TrainConfig(
      attention=recipe.AttentionSpec(by_group=True)))
  check_attention(by_group, LlamaConfig(num_attention_heads=4))
  with pytest.raises(LongLoraError, match="--s2-by-group cannot run llama: "
                     "its o projection has a bias; drop it$"):
    check_attention(by_group, LlamaConfig(num_attention_heads=4,
                                          o_bias=True))


def test_extension_packs_documents_end_to_end(tmp_path):
  # The demo's byte tokenizer: " " (byte 32) is id 223, "a".."d" 67..70
  # (3 specials, then GPT-2's byte alphabet in sorted order: printable
  # ASCII from "!" first, the unprintable bytes after all 188 printable).
  data = tmp_path / "docs.jsonl"
  data.write_text("".join(json.dumps({"body": t}) + "\n"
                          for t in ("ab", "cd", "a")))
  base = Checkpoint.open("demo")
  spec = _spec(EXTEND, 4, data=str(data), text_field="body")
  rows = EXTEND.rows(spec, base, Position())
  first = [next(rows) for _ in range(2)]
  assert sorted(tuple(row["input_ids"]) for row, _ in first) == [
      (223, 67, 68, 2), (223, 69, 70, 2)]
  assert first[-1][1] == Position(0, 0, 0, 2)  # the last row of the pass
  # The next pass starts over ("a" + EOS, 3 tokens, is no row of 4).
  assert next(rows)[1] == Position(1, 0, 0, 1)


def test_fine_tuning_packs_examples_with_segments(tmp_path, capsys):
  data = tmp_path / "records.jsonl"
  data.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
  base = Checkpoint.open("demo")
  row, position = next(SFT.rows(_spec(SFT, 64, data=str(data)), base,
                                Position()))
  assert set(row) == {"input_ids", "labels", "segment_ids", "positions"}
  # BOS + " [INST]q[/INST]" (15 bytes) + "a" + EOS: 18 tokens, then padding
  # (id 0, segment 0); labels (unshifted) on "a" and EOS only.
  assert list(row["segment_ids"][:19]) == [1] * 18 + [0]
  assert list(row["input_ids"][16:19]) == [67, 2, 0]
  assert list(np.flatnonzero(row["labels"] >= 0)) == [16, 17]
  assert list(row["labels"][16:18]) == [67, 2]
  assert position == Position(0, 0, 0, 1)
  long = _spec(SFT, 8, data=str(data))
  next(SFT.rows(long, base, Position()))
  assert "1 of 1 examples are longer than --ctx 8" in capsys.readouterr().out


def test_run_json_names_the_task():
  assert named("extend") is EXTEND and named("sft") is SFT
  assert set(TASKS) == {"extend", "sft"}
  spec = _spec("sft", 64)
  assert spec.task is SFT and spec.data == "Yukang/LongAlpaca-12k"
  assert spec.to_dict()["task"] == "sft"
  assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
  assert _spec(EXTEND, 64).data == "togethercomputer/RedPajama-Data-1T-Sample"
  with pytest.raises(LongLoraError, match="unknown task 'pretrain'; this "
                     "version trains extend and sft"):
    named("pretrain")


def test_an_unknown_task_in_run_json_is_one_line(tmp_path):
  record = _spec(EXTEND, 64).to_dict()
  (tmp_path / "run.json").write_text(json.dumps({**record, "task": "x"}))
  with pytest.raises(LongLoraError, match="run.json: not a run record of "
                     "this version .*unknown task 'x'"):
    recipe.read_spec(tmp_path)


@pytest.mark.parametrize("task,name,content,message", [
    (EXTEND, "rows.parquet", "PAR1 not a parquet file", "not a readable Parquet"),
    (EXTEND, "train.jsonl", "", "empty file"),
    (SFT, "chat.parquet", "PAR1", "not a readable Parquet"),
])
def test_damaged_data_is_refused_before_any_weight_is_read(
    tmp_path, task, name, content, message):
  path = tmp_path / name
  path.write_text(content)
  spec = RunSpec(ckpt="demo", ctx=64, task=task, base_config={}, data=str(path))
  with pytest.raises(LongLoraError, match=re.escape(str(path))) as e:
    task.check_data(spec)
  assert message in str(e.value)
