import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax import LlamaConfig, LongLoraError, forward, init_params
from longlora_jax.data import sft
from longlora_jax.checkpoints.tokenizer import load_tokenizer
from longlora_jax.model.loss import IGNORE_INDEX
from longlora_jax.data.sft import Example, format_prompt, pack, tokenize_example
from tests.conftest import SHARED_TOKENIZER


class CharTokenizer:
  """BOS, then one id per character; "</s>" is the EOS id 2."""
  eos_token = "</s>"
  bos_token_id, eos_token_id = 1, 2

  def __call__(self, text):
    ids = [1]
    for i, part in enumerate(text.split("</s>")):
      if i:
        ids.append(2)
      ids += [ord(c) for c in part]
    return {"input_ids": ids}


def test_prompt_formats_are_the_official_ones():
  assert format_prompt({"instruction": "Sum it up.", "output": "x"}) == (
      "[INST]Sum it up.[/INST]")
  with_input = format_prompt({"instruction": "Answer.", "input": "2+2?",
                              "output": "4"})
  assert with_input.startswith("[INST] <<SYS>>\nYou are a helpful, respectful "
                               "and honest assistant.")
  assert with_input.endswith("<</SYS>> \n\n Answer. \n2+2? [/INST]")
  with pytest.raises(LongLoraError, match="needs 'instruction' and 'output'"):
    format_prompt({"question": "?"})


def test_labels_mask_exactly_the_prompt():
  ex = tokenize_example(CharTokenizer(), {"instruction": "hi", "output": "ok"},
                        max_len=100)
  # [BOS] + "[INST]hi[/INST]" (15 chars) + "ok" + [EOS]
  assert list(ex.input_ids) == [1] + [ord(c) for c in "[INST]hi[/INST]ok"] + [2]
  assert list(ex.labels) == [IGNORE_INDEX] * 16 + [ord("o"), ord("k"), 2]
  assert not ex.truncated
  cut = tokenize_example(CharTokenizer(), {"instruction": "hi", "output": "ok"},
                         max_len=17)
  assert cut.truncated and len(cut.input_ids) == 17
  assert list(cut.labels) == [IGNORE_INDEX] * 16 + [ord("o")]


@pytest.mark.skipif(not os.path.isdir(SHARED_TOKENIZER),
                    reason="shared Llama-2 tokenizer fixture not present")
def test_labels_with_the_real_llama2_tokenizer():
  tok = load_tokenizer(SHARED_TOKENIZER)
  record = {"instruction": "Name a colour.", "output": "Blue."}
  ex = tokenize_example(tok, record, max_len=512)
  n_prompt = len(tok("[INST]Name a colour.[/INST]")["input_ids"])
  assert ex.input_ids[0] == 1 and ex.input_ids[-1] == 2
  assert (ex.labels[:n_prompt] == IGNORE_INDEX).all()
  assert (ex.labels[n_prompt:] == ex.input_ids[n_prompt:]).all()
  assert tok.decode(ex.input_ids[n_prompt:-1]).strip() == "Blue."


def _ex(n, start=0, ids=None):
  ids = np.arange(start, start + n, dtype=np.int32) if ids is None else ids
  return Example(ids.astype(np.int32), ids.astype(np.int32), False)


def test_pack_rows():
  examples = [_ex(5, 10), _ex(4, 20), _ex(6, 30), _ex(8, 40)]
  rows = list(pack(examples, ctx=10, pad_id=0))
  assert len(rows) == 3  # [5 + 4], [6], [8]: examples are never split
  r = rows[0]
  np.testing.assert_array_equal(r["input_ids"], [10, 11, 12, 13, 14, 20, 21, 22, 23, 0])
  np.testing.assert_array_equal(r["segment_ids"], [1, 1, 1, 1, 1, 2, 2, 2, 2, 0])
  np.testing.assert_array_equal(r["positions"], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0])
  assert r["labels"][-1] == IGNORE_INDEX
  np.testing.assert_array_equal(rows[2]["segment_ids"], [1] * 8 + [0, 0])
  with pytest.raises(LongLoraError, match="exceeds the context 10"):
    list(pack([_ex(11, 0)], ctx=10, pad_id=0))


@pytest.mark.parametrize("attention", ["full", "chunked", "s2"])
def test_packed_examples_never_see_each_other(attention):
  cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                    num_hidden_layers=2, num_attention_heads=4,
                    initializer_range=0.3)
  params = init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  a = _ex(13, ids=rng.integers(3, 64, 13))
  b = _ex(17, ids=rng.integers(3, 64, 17))
  row = next(pack([a, b], ctx=32, pad_id=0))

  def logits(ids):
    return np.asarray(forward(
        cfg, params, jnp.asarray(ids[None]), attention=attention,
        positions_BT=jnp.asarray(row["positions"][None]),
        segment_ids_BT=jnp.asarray(row["segment_ids"][None])))[0]

  base = logits(row["input_ids"])
  changed = row["input_ids"].copy()
  changed[:13] = rng.integers(3, 64, 13)  # perturb example 1 only
  after = logits(changed)
  np.testing.assert_array_equal(after[13:30], base[13:30])
  assert np.abs(after[:13] - base[:13]).max() > 1e-3
  if attention != "s2":  # S² sees only its group; full attention equals alone
    alone = np.asarray(forward(cfg, params, jnp.asarray(b.input_ids[None])))[0]
    np.testing.assert_allclose(base[13:30], alone, atol=1e-5)


def test_sft_rows_resume_and_reshuffle_each_epoch():
  examples = [sft.Example(np.full(n, n, np.int32), np.full(n, n, np.int32),
                          False) for n in (3, 5, 2, 7, 4, 6)]
  stream = sft.sft_rows(examples, 8, pad_id=0, seed=1)
  pairs = [next(stream) for _ in range(12)]
  again = sft.sft_rows(examples, 8, pad_id=0, seed=1, start=pairs[6][1])
  for (want, _), (got, _) in zip(pairs[7:], again):
    np.testing.assert_array_equal(want["input_ids"], got["input_ids"])
  # Every example once per epoch; the two epochs in different orders.
  epochs = [[r for r, p in pairs if p.epoch == e] for e in (0, 1)]
  firsts = [[int(ids[0]) for ids in
             (r["input_ids"][r["segment_ids"] == s] for r in rows
              for s in range(1, r["segment_ids"].max() + 1))]
            for rows in epochs]
  assert sorted(firsts[0]) == sorted(firsts[1]) == [2, 3, 4, 5, 6, 7]
  assert firsts[0] != firsts[1]


def test_load_examples_counts_truncations(tmp_path):
  import json
  records = [{"instruction": "hi", "output": "yo"},  # 1 + 15 + 2 + 1 = 19
             {"instruction": "x" * 40, "output": "long answer"}]
  path = tmp_path / "r.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  examples, truncated = sft.load_examples(str(path), CharTokenizer(), 32)
  assert truncated == 1
  assert [len(e.input_ids) for e in examples] == [19, 32]
  assert (examples[0].labels != IGNORE_INDEX).sum() == 3  # "yo" + EOS


def test_records_must_hold_strings(tmp_path):
  import json
  import pyarrow as pa
  import pyarrow.parquet as pq
  path = tmp_path / "r.jsonl"
  cases = [
      ({"instruction": "hi", "output": 4}, "record 1 at line 1: 'output' is "
       "a number, not a string; fix or remove the file"),
      ({"instruction": "hi", "output": "yo", "input": ["a"]}, "record 1 at "
       "line 1: 'input' is a list, not a string; fix or remove the file"),
  ]
  for record, message in cases:
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(LongLoraError) as error:
      sft.load_examples(str(path), CharTokenizer(), 32)
    assert str(error.value) == f"{path}: {message}"
  # No "input", or a null one: the prompt without input.
  path.write_text(json.dumps({"instruction": "hi", "output": "yo",
                              "input": None}) + "\n")
  (example,), _ = sft.load_examples(str(path), CharTokenizer(), 32)
  assert len(example.input_ids) == 19
  # A Parquet file without an output column fails on opening, before any
  # record is tokenised.
  pq.write_table(pa.table({"instruction": ["hi"]}), tmp_path / "r.parquet")

  def never(*args, **kwargs):
    raise AssertionError("nothing is tokenised")
  with pytest.raises(LongLoraError) as error:
    sft.load_examples(str(tmp_path / "r.parquet"), never, 32)
  assert str(error.value) == (f"{tmp_path / 'r.parquet'}: no 'output' column "
                              "(it has 'instruction')")
