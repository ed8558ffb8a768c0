import itertools
import json
import time

import numpy as np
import pytest

from longlora_jax import LongLoraError
from longlora_jax.data.sources import load_tokens
from longlora_jax.data.text import (Position, batches, document_tokens,
                                    packed_rows, prefetch, tokenize_documents,
                                    write_tokens)


def test_bin_round_trip_is_raw_uint16(tmp_path):
  tokens = np.array([1, 2, 65535, 0, 31999])
  write_tokens(tmp_path / "t.bin", tokens)
  # The official format: raw little-endian uint16, no header.
  assert (tmp_path / "t.bin").read_bytes() == np.array(tokens, "<u2").tobytes()
  np.testing.assert_array_equal(load_tokens(tmp_path / "t.bin"), tokens)
  assert not list(tmp_path.glob(".*"))


def test_npy_for_large_vocabularies(tmp_path):
  tokens = np.array([5, 128000, 7])
  with pytest.raises(LongLoraError, match="do not fit .bin"):
    write_tokens(tmp_path / "t.bin", tokens)
  write_tokens(tmp_path / "t.npy", tokens)
  np.testing.assert_array_equal(load_tokens(tmp_path / "t.npy"), tokens)


def test_tokenize_documents_concatenates_with_bos():
  class Tok:
    def __call__(self, text):
      return {"input_ids": [1] + [ord(c) for c in text]}
  np.testing.assert_array_equal(tokenize_documents(Tok(), ["ab", "c"]),
                                [1, 97, 98, 1, 99])
  np.testing.assert_array_equal(
      tokenize_documents(Tok(), ["abc", "def", "ghi"], max_tokens=5),
      [1, 97, 98, 99, 1])


# ---- packing ----

class ByteTok:
  """Stands in for a HF tokenizer: one id per character, batched."""

  def __call__(self, texts, add_special_tokens=True):
    assert not add_special_tokens
    return {"input_ids": [[ord(c) for c in t] for t in texts]}


def _jsonl(path, texts):
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  return str(path)


def _docs(tmp_path, n=30, seed=0):
  rng = np.random.default_rng(seed)
  texts = ["".join(chr(97 + int(c)) for c in rng.integers(0, 26, rng.integers(1, 40)))
           for _ in range(n)]
  return texts, document_tokens(_jsonl(tmp_path / "d.jsonl", texts), ByteTok(),
                                eos_id=0)


def test_rows_are_documents_joined_with_eos(tmp_path):
  texts, docs = _docs(tmp_path)
  stream = np.concatenate([[ord(c) for c in t] + [0] for t in texts])
  rows = [r for r, _ in itertools.islice(
      packed_rows(docs, 16, block_rows=1), len(stream) // 16)]
  # block_rows=1: no shuffling, so the rows are the stream cut every 16
  # tokens; the last partial row is dropped, and the next pass begins.
  assert all(r.shape == (16,) for r in rows)
  np.testing.assert_array_equal(np.concatenate(rows),
                                stream[:len(stream) // 16 * 16])
  second_pass = next(packed_rows(docs, 16, block_rows=1,
                                 start=Position(epoch=1)))[0]
  np.testing.assert_array_equal(second_pass, stream[:16])


def test_blocks_are_shuffled_by_seed(tmp_path):
  _, docs = _docs(tmp_path, n=60)
  take = lambda seed: np.stack([r for r, _ in itertools.islice(
      packed_rows(docs, 8, seed=seed, block_rows=10), 40)])
  a, b = take(0), take(1)
  np.testing.assert_array_equal(a, take(0))
  assert not np.array_equal(a, b)
  # Each block of 10 holds the same rows whatever the seed.
  for i in range(0, 40, 10):
    assert sorted(map(tuple, a[i:i + 10])) == sorted(map(tuple, b[i:i + 10]))


def test_resuming_at_any_position_gives_the_same_rows(tmp_path):
  _, docs = _docs(tmp_path, n=12)
  # Blocks of 5 rows, a partial block at the end of each pass, 40 rows
  # over more than one pass.
  pairs = list(itertools.islice(packed_rows(docs, 12, seed=3, block_rows=5), 40))
  for k in range(len(pairs) - 1):
    resumed = packed_rows(docs, 12, seed=3, block_rows=5, start=pairs[k][1])
    for want, got in zip(pairs[k + 1:k + 6], resumed):
      np.testing.assert_array_equal(got[0], want[0])
      assert got[1] == want[1]
  assert pairs[-1][1].epoch >= 1  # The stream went on to another pass.


def test_resuming_does_not_tokenise_what_came_before(tmp_path):
  calls = []

  class Counting(ByteTok):
    def __call__(self, texts, add_special_tokens=True):
      calls.extend(texts)
      return super().__call__(texts, add_special_tokens)
  texts = [f"document {i:03d} " * 3 for i in range(200)]
  docs = document_tokens(_jsonl(tmp_path / "d.jsonl", texts), Counting(),
                         eos_id=0, batch_docs=4)
  assert [i for i, _ in docs(150)][:2] == [150, 151]
  assert calls[0] == texts[150] and len(calls) == 50


def test_batches_and_token_files(tmp_path):
  tokens = np.arange(1000) % 300
  write_tokens(tmp_path / "t.bin", tokens)
  docs = document_tokens(str(tmp_path / "t.bin"))
  batch, position = next(batches(packed_rows(docs, 50, block_rows=100), (2, 3)))
  assert batch.shape == (2, 3, 50)
  # 20 rows, one shuffled block; rows are the file cut every 50 tokens.
  starts = sorted(int(r[0]) for r in batch.reshape(6, 50))
  assert all(s % 50 == 0 for s in starts) and position == Position(row=6)
  np.testing.assert_array_equal(batch[0, 0], np.arange(batch[0, 0, 0],
                                                       batch[0, 0, 0] + 50) % 300)


def test_too_little_data(tmp_path):
  docs = document_tokens(_jsonl(tmp_path / "d.jsonl", ["tiny", "doc"]),
                         ByteTok(), eos_id=0)
  with pytest.raises(LongLoraError, match="yields 9 tokens, fewer than one "
                     "row of 64"):
    next(packed_rows(docs, 64, source="d.jsonl"))
  with pytest.raises(LongLoraError, match="no such file or directory"):
    document_tokens(str(tmp_path / "missing.jsonl"), ByteTok(), eos_id=0)


def test_damaged_data_fails_before_a_document_is_read(tmp_path):
  # What opening shows (here a Parquet footer cut off, a .npy header cut
  # short) fails when the source is opened, before anything is tokenised.
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": ["a document"] * 3}), tmp_path / "d.parquet")
  data = (tmp_path / "d.parquet").read_bytes()
  (tmp_path / "d.parquet").write_bytes(data[:len(data) // 2])
  np.save(tmp_path / "t.npy", np.arange(10))
  (tmp_path / "t.npy").write_bytes((tmp_path / "t.npy").read_bytes()[:40])

  class Never:
    def __call__(self, *args, **kwargs):
      raise AssertionError("nothing is tokenised")
  for name in ("d.parquet", "t.npy"):
    with pytest.raises(LongLoraError, match=rf"^{tmp_path / name}: not a "):
      document_tokens(str(tmp_path / name), Never(), eos_id=0)


def test_prefetch_runs_ahead_and_forwards_errors():
  produced = []

  def numbers():
    for i in range(10):
      produced.append(i)
      yield i
    raise LongLoraError("bad record")
  it = prefetch(numbers(), size=3)
  assert next(it) == 0
  time.sleep(0.2)
  assert len(produced) >= 4  # Filled the queue while we did nothing.
  assert list(itertools.islice(it, 9)) == list(range(1, 10))
  with pytest.raises(LongLoraError, match="bad record"):
    next(it)
  endless = prefetch(itertools.count(), size=2)
  assert next(endless) == 0
  endless.close()  # Stops its thread (else it would block on a full queue).
