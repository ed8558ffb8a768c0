"""Token streams: writing flat token files (see `sources` for the
format), tokenising text, packing documents into training rows.
"""

import dataclasses
import itertools
import os
import queue
import threading
from pathlib import Path
from typing import Iterable

import numpy as np

from longlora_jax.core.errors import LongLoraError
from longlora_jax.core.files import atomic_path
from longlora_jax.data.sources import (TOKEN_SUFFIXES, check_source,
                                       iter_texts, load_tokens)


def write_tokens(path: str | os.PathLike, tokens: np.ndarray) -> Path:
  """Writes .bin (uint16) or .npy, via a temporary name."""
  path = Path(path)
  tokens = np.asarray(tokens)
  if path.suffix not in (".bin", ".npy"):
    raise LongLoraError(f"{path}: choose a .bin or .npy output")
  if path.suffix == ".bin" and tokens.size and (
      int(tokens.max()) > np.iinfo(np.uint16).max):
    raise LongLoraError(f"{path}: token ids above 65535 do not fit .bin "
                        "(uint16); write .npy instead")
  with atomic_path(path) as tmp:
    if path.suffix == ".bin":
      tokens.astype("<u2").tofile(tmp)
    else:
      np.save(tmp, tokens.astype(np.uint32 if tokens.max(initial=0) > 65535
                                 else np.uint16))
  return path


def tokenize_documents(tokenizer, texts: Iterable[str], *,
                       max_tokens: int | None = None) -> np.ndarray:
  """Token ids of the documents, each with the tokenizer's BOS, concatenated."""
  pieces, total = [], 0
  for text in texts:
    ids = tokenizer(text)["input_ids"]
    pieces.append(np.asarray(ids, np.int64))
    total += len(ids)
    if max_tokens and total >= max_tokens:
      break
  if not pieces:
    raise LongLoraError("no documents to tokenise")
  tokens = np.concatenate(pieces)
  return tokens[:max_tokens] if max_tokens else tokens


# ---- packing documents into training rows ----
#
# Documents are tokenised without special tokens, each followed by EOS, and
# the stream is cut into rows of exactly `ctx` tokens, as the official
# LongLoRA fine-tuning does (it pads the last row; we drop it). Rows come in
# blocks of consecutive stream; each block is shuffled with a seed derived
# from where it starts, so the order is a pure function of (data, seed) and a
# `Position` of four integers resumes it exactly without replaying the
# tokeniser over what came before.

# A flat token file is read in pieces of this many tokens (its "documents").
_TOKEN_PIECE = 1 << 20


@dataclasses.dataclass(frozen=True)
class Position:
  """Where a row stream resumes: `row` rows into the shuffled block that
  starts `offset` tokens into document `doc` of pass `epoch` over the data."""
  epoch: int = 0
  doc: int = 0
  offset: int = 0
  row: int = 0


def document_tokens(source: str, tokenizer=None, *, eos_id: int | None = None,
                    text_field: str = "text", batch_docs: int = 64,
                    vocab_size: int | None = None):
  """`docs(start) -> iterator of (index, token ids)` over a data source.

  Text sources (see `iter_texts`) are tokenised in batches (a fast
  tokenizer encodes a batch on all cores), each document followed by
  `eos_id`; documents before `start` are read but not tokenised. A flat
  token file (.bin/.npy) is used as is, in pieces, after its ids are
  checked against `vocab_size` (when given).
  """
  if Path(source).suffix in TOKEN_SUFFIXES:
    tokens = load_tokens(source, vocab_size)

    def pieces(start: int):
      for i in range(start, -(-len(tokens) // _TOKEN_PIECE)):
        yield i, np.asarray(tokens[i * _TOKEN_PIECE:(i + 1) * _TOKEN_PIECE])
    return pieces
  if tokenizer is None or eos_id is None:
    raise ValueError("text sources need a tokenizer and an eos_id")
  check_source(source, (text_field,))

  def docs(start: int):
    texts = itertools.islice(iter_texts(source, text_field=text_field),
                             start, None)
    index = start
    for batch in _batched(texts, batch_docs):
      for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
        yield index, np.asarray([*ids, eos_id], np.int32)
        index += 1
  return docs


def _batched(items, n):
  it = iter(items)
  while batch := list(itertools.islice(it, n)):
    yield batch


def _blocks(docs, ctx: int, block_rows: int, doc: int, offset: int):
  """(doc, offset, rows [n, ctx]) blocks of the stream from `offset` tokens
  into document `doc`; every block but the last has `block_rows` rows."""
  need = block_rows * ctx
  pieces, have, start = [], 0, (doc, offset)
  for d, ids in docs(doc):
    pos = offset if d == doc else 0
    while pos < len(ids):
      take = min(len(ids) - pos, need - have)
      pieces.append(ids[pos:pos + take])
      have, pos = have + take, pos + take
      if have == need:
        yield (*start, np.concatenate(pieces).reshape(block_rows, ctx))
        pieces, have, start = [], 0, (d, pos)
  if have >= ctx:
    rows = have // ctx  # The last partial row is dropped, not padded.
    yield (*start, np.concatenate(pieces)[:rows * ctx].reshape(rows, ctx))


def packed_rows(docs, ctx: int, *, seed: int = 0, start: Position = Position(),
                block_rows: int = 256, source: str = "the data"):
  """Endless (row [ctx], position after it) pairs, epoch after epoch.

  `docs` is `document_tokens(...)`. Each block of `block_rows` rows is
  shuffled by a generator seeded with (seed, epoch, doc, offset) of its
  start, so resuming at a `Position` gives exactly the rows that followed it.

  Raises:
    LongLoraError: a full pass over the data holds fewer than `ctx` tokens.
  """
  epoch, doc, offset, row = (start.epoch, start.doc, start.offset, start.row)
  while True:
    any_rows = False
    for d, o, rows in _blocks(docs, ctx, block_rows, doc, offset):
      any_rows = True
      order = np.random.default_rng([seed, epoch, d, o]).permutation(len(rows))
      for r in range(row, len(rows)):
        yield rows[order[r]], Position(epoch, d, o, r + 1)
      row = 0
    if not any_rows and (doc, offset) == (0, 0):
      total = sum(len(ids) for _, ids in docs(0))
      raise LongLoraError(
          f"{source} yields {total} tokens, fewer than one row of {ctx} "
          "(--ctx); use more data or a shorter context")
    epoch, doc, offset, row = epoch + 1, 0, 0, 0


def batches(rows, shape: tuple[int, ...]):
  """(batch, position after it) from (row, position) pairs: a row is an
  array [ctx] or a dict of them (`sft.sft_rows`), the batch has the same
  structure with arrays [*shape, ctx]; shape is e.g. (accum, rows per
  micro-batch)."""
  n = int(np.prod(shape))
  stack = lambda xs: np.stack(xs).reshape(*shape, -1)
  while True:
    taken = list(itertools.islice(rows, n))
    if len(taken) < n:
      return
    first = taken[0][0]
    if isinstance(first, dict):
      batch = {k: stack([r[k] for r, _ in taken]) for k in first}
    else:
      batch = stack([r for r, _ in taken])
    yield batch, taken[-1][1]


def prefetch(iterator, size: int = 4):
  """`iterator` run ahead in a background thread, `size` items queued.

  Tokenising and packing then overlap with the device's work. An exception
  in the thread is raised here, at the item where it happened; `close()` on
  the returned generator stops the thread.
  """
  q = queue.Queue(maxsize=size)
  stop = threading.Event()
  done = object()

  def put(entry) -> bool:
    while not stop.is_set():
      try:
        q.put(entry, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def fill():
    try:
      for item in iterator:
        if not put((item, None)):
          return
      put((done, None))
    except BaseException as e:  # Handed to the consumer, not lost.
      put((done, e))

  thread = threading.Thread(target=fill, daemon=True, name="prefetch")
  thread.start()
  try:
    while True:
      item, error = q.get()
      if error is not None:
        raise error
      if item is done:
        return
      yield item
  finally:
    stop.set()
