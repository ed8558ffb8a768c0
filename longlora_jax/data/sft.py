"""Supervised fine-tuning data: LongAlpaca-style prompts, label masking, packing.

Records are `{"instruction", "output"}` with an optional `"input"`. The prompt
formats and the masking follow the official LongLoRA supervised fine-tuning:
the prompt (with its BOS) is labelled IGNORE_INDEX, the loss falls on
`output + eos` only, and over-long examples are truncated to the context.

Unlike the official padding to the longest example of a batch, examples are
packed several to a row; each gets its own segment id and positions from 0,
and attention never crosses segments.
"""

import dataclasses
import itertools
from typing import Iterable, Iterator

import numpy as np

from longlora_jax.data.sources import check_source, iter_records
from longlora_jax.data.text import Position
from longlora_jax.core.errors import LongLoraError
from longlora_jax.model.loss import IGNORE_INDEX

LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as "
    "helpfully as possible, while being safe.  Your answers should not include "
    "any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and "
    "positive in nature.\n\nIf a question does not make any sense, or is not "
    "factually coherent, explain why instead of answering something not "
    "correct. If you don't know the answer to a question, please don't share "
    "false information.\n")
PROMPT_NO_INPUT = "[INST]{instruction}[/INST]"
PROMPT_INPUT = ("[INST] <<SYS>>\n" + LLAMA2_SYSTEM
                + "<</SYS>> \n\n {instruction} \n{input} [/INST]")
# The official long-document chat prompt (eval.chat).
CHAT_PROMPT = "[INST]{material}\n{question}[/INST]"


def format_prompt(record: dict) -> str:
  """The prompt of a record: the Llama-2 system form when it has an input."""
  if "instruction" not in record or "output" not in record:
    raise LongLoraError(f"an SFT record needs 'instruction' and 'output', got "
                        f"keys {sorted(record)}")
  if record.get("input"):
    return PROMPT_INPUT.format(instruction=record["instruction"],
                               input=record["input"])
  return PROMPT_NO_INPUT.format(instruction=record["instruction"])


@dataclasses.dataclass(frozen=True)
class Example:
  input_ids: np.ndarray  # [n] int32
  labels: np.ndarray  # [n] int32, IGNORE_INDEX over the prompt
  truncated: bool


def tokenize_example(tokenizer, record: dict, max_len: int) -> Example:
  """Prompt + output + eos, truncated to `max_len`; labels mask the prompt.

  As the official preprocessing: the whole text and the prompt alone are
  tokenised separately, and the prompt's token count (BOS included) is how
  many leading labels are masked.
  """
  prompt = format_prompt(record)
  text = prompt + f"{record['output']}{tokenizer.eos_token}"
  ids = np.asarray(tokenizer(text)["input_ids"], np.int32)
  n_prompt = len(tokenizer(prompt)["input_ids"])
  labels = ids.copy()
  labels[:n_prompt] = IGNORE_INDEX
  truncated = len(ids) > max_len
  return Example(ids[:max_len], labels[:max_len], truncated)


def pack(examples: Iterable[Example], ctx: int, pad_id: int) -> Iterator[dict]:
  """Rows of exactly `ctx` tokens, several examples each, in order.

  Yields dicts of int32 arrays `input_ids`, `labels`, `segment_ids` (1, 2,
  ... per example; 0 for padding) and `positions` (restarting at 0 for each
  example). An example goes to the current row if it fits, else starts a new
  one (examples are at most `ctx` long after truncation).
  """
  row = []
  used = 0
  for ex in examples:
    if len(ex.input_ids) > ctx:
      raise LongLoraError(f"an example of {len(ex.input_ids)} tokens exceeds "
                          f"the context {ctx}; truncate it first")
    if used + len(ex.input_ids) > ctx and row:
      yield _row(row, ctx, pad_id)
      row, used = [], 0
    row.append(ex)
    used += len(ex.input_ids)
  if row:
    yield _row(row, ctx, pad_id)


def _row(examples: list[Example], ctx: int, pad_id: int) -> dict:
  ids = np.full(ctx, pad_id, np.int32)
  labels = np.full(ctx, IGNORE_INDEX, np.int32)
  segments = np.zeros(ctx, np.int32)
  positions = np.zeros(ctx, np.int32)
  start = 0
  for i, ex in enumerate(examples, 1):
    end = start + len(ex.input_ids)
    ids[start:end] = ex.input_ids
    labels[start:end] = ex.labels
    segments[start:end] = i
    positions[start:end] = np.arange(end - start)
    start = end
  # Padding: its own segment, positions continuing so RoPE stays in range.
  positions[start:] = np.arange(ctx - start)
  return {"input_ids": ids, "labels": labels, "segment_ids": segments,
          "positions": positions}


# The fields every instruction record has ("input" is optional).
FIELDS = ("instruction", "output")


def load_examples(source: str, tokenizer,
                  ctx: int) -> tuple[list[Example], int]:
  """(examples, how many were truncated) of every record in `source` (a
  .json/.jsonl/.parquet file, a directory of them or a HF dataset name);
  "instruction" and "output" must be strings, "input" one where given."""
  check_source(source, FIELDS)
  examples = [tokenize_example(tokenizer, r, ctx) for r in
              iter_records(source, fields=FIELDS, optional=("input",))]
  if not examples:
    raise LongLoraError(f"{source}: no instruction records")
  return examples, sum(e.truncated for e in examples)


def sft_rows(examples: list[Example], ctx: int, pad_id: int, *, seed: int = 0,
             start: Position = Position()) -> Iterator[tuple[dict, Position]]:
  """Endless (packed row, position after it) pairs, epoch after epoch.

  Each epoch packs the examples in an order seeded by (seed, epoch), so a
  `Position` (its epoch and row) resumes the stream exactly.
  """
  epoch, row = start.epoch, start.row
  while True:
    order = np.random.default_rng([seed, epoch]).permutation(len(examples))
    rows = pack((examples[i] for i in order), ctx, pad_id)
    for r, packed in enumerate(itertools.islice(rows, row, None), row):
      yield packed, Position(epoch=epoch, row=r + 1)
    epoch, row = epoch + 1, 0
