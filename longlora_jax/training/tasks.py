"""The tasks a run trains for, one object each: what differs between
context extension (`EXTEND`, `python -m train.extend`) and supervised
fine-tuning on long instructions (`SFT`, `python -m train.sft`).

The engine asks the run's task (its data, its RoPE rule, which contexts it
takes, what its rows hold) and never compares names; run.json records the
task by its name (`named` reads it back).
"""

import dataclasses
from pathlib import Path
from typing import Callable, Iterator, Mapping

from longlora_jax.core.errors import LongLoraError
from longlora_jax.data import sft
from longlora_jax.data.sources import TOKEN_SUFFIXES, check_source, load_tokens
from longlora_jax.data.text import Position, document_tokens, packed_rows
from longlora_jax.model.config import LlamaConfig

REDPAJAMA = "togethercomputer/RedPajama-Data-1T-Sample"
LONGALPACA = "Yukang/LongAlpaca-12k"


@dataclasses.dataclass(frozen=True)
class Task:
  """One task of the engine.

  name: its name in run.json and its command (`python -m train.NAME`);
  data: its default --data; rows: (spec, base checkpoint, start position)
  -> the (row, position after it) pairs it trains on, a row a dict of
  [ctx] arrays; extends: --ctx must exceed the checkpoint's context and the
  RoPE factor rises to reach it (else a checkpoint already long enough
  keeps its scaling); packed: rows hold several examples that attention
  must not cross; text_field: its records have a text column
  (--text-field); makes: the kind of model a run makes, which names the
  commands that evaluate it; help: the help of --ckpt, --ctx and --data;
  needs: what --ckpt and --ctx are, for a new run that lacks them ("{ctx}"
  in them is four times the checkpoint's context).
  """
  name: str
  data: str
  rows: Callable[..., Iterator[tuple[dict, Position]]]
  extends: bool
  packed: bool
  text_field: bool
  makes: str
  help: Mapping[str, str]
  needs: Mapping[str, str]

  def target_config(self, config: LlamaConfig, ctx: int,
                    rope: str = "auto") -> LlamaConfig:
    """`config` with the RoPE scaling a run at `ctx` trains with
    (`LlamaConfig.with_context` with `rope`: by default linear PI by
    ceil(ctx / original context), or a llama3/yarn config's own type)."""
    if not self.extends and config.context >= ctx:
      return config  # An extended model tuned on rows it already takes.
    return config.with_context(ctx, None if rope == "auto" else rope)

  def check_data(self, spec) -> None:
    """Refuses missing or damaged --data in one line before any weight is
    read (what opening it shows; damage further in shows when read)."""
    if Path(spec.data).suffix in TOKEN_SUFFIXES:
      load_tokens(spec.data)  # its size and .npy header; ids when read
    else:
      check_source(spec.data,
                   (spec.text_field,) if self.text_field else sft.FIELDS)


def _documents(spec, base, start: Position):
  """Documents packed end to end into rows of spec.ctx tokens."""
  docs = document_tokens(spec.data, base.tokenizer, eos_id=base.eos_id,
                         text_field=spec.text_field,
                         vocab_size=base.config.vocab_size)
  return (({"input_ids": row}, position) for row, position in packed_rows(
      docs, spec.ctx, seed=spec.seed, start=start, source=spec.data))


def _instructions(spec, base, start: Position):
  """Instruction examples packed several to a row, with segment ids and
  the loss on the answers only."""
  examples, truncated = sft.load_examples(spec.data, base.tokenizer, spec.ctx)
  if truncated:
    print(f"warning: {truncated} of {len(examples)} examples are longer than "
          f"--ctx {spec.ctx} tokens and were truncated")
  pad_id = base.tokenizer.pad_token_id
  yield from sft.sft_rows(examples, spec.ctx,
                          base.eos_id if pad_id is None else pad_id,
                          seed=spec.seed, start=start)


EXTEND = Task(
    name="extend", data=REDPAJAMA, rows=_documents, extends=True,
    packed=False, text_field=True, makes="long-context",
    help={"ckpt": "hf:ORG/NAME or a local HF checkpoint directory",
          "ctx": "target context in tokens",
          "data": "HF dataset name (streamed), .txt/.md/.jsonl/.json/"
                  ".parquet file or a directory of them, or a .bin/.npy "
                  "token file"},
    needs={"ckpt": "the model to extend",
           "ctx": "the context to extend to, e.g. --ctx {ctx}"})

SFT = Task(
    name="sft", data=LONGALPACA, rows=_instructions, extends=False,
    packed=True, text_field=False, makes="chat",
    help={"ckpt": "hf:ORG/NAME or a local HF checkpoint directory, usually "
                  "a context-extended model",
          "ctx": "tokens per packed row (its RoPE scaling is kept, or raised "
                 "to ceil(ctx / original))",
          "data": "{instruction, output[, input]} records: HF dataset name, "
                  ".json/.jsonl/.parquet file or a directory of them"},
    needs={"ckpt": "the model to fine-tune, e.g. the merged model of a "
                   "train.extend run (runs/demo/extend/hf)",
           "ctx": "the tokens per training row"})

TASKS = {task.name: task for task in (EXTEND, SFT)}


def named(name: str) -> Task:
  """The task run.json names `name`."""
  if name not in TASKS:
    raise LongLoraError(f"unknown task {name!r}; this version trains "
                        f"{' and '.join(TASKS)}")
  return TASKS[name]
