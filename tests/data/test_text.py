import itertools
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longlora_jax import LongLoraError
from longlora_jax.data.text import (Position, batches, document_tokens,
                               iter_texts, load_tokens, packed_rows, prefetch,
                               tokenize_documents, write_tokens)


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


@pytest.mark.parametrize("name,content,message", [
    ("odd.bin", b"\x01\x02\x03", "odd size"),
    ("x.csv", b"1,2", "not a token file"),
])
def test_bad_token_files(tmp_path, name, content, message):
  (tmp_path / name).write_bytes(content)
  with pytest.raises(LongLoraError, match=message):
    load_tokens(tmp_path / name)
  with pytest.raises(LongLoraError, match="no such file"):
    load_tokens(tmp_path / "missing.bin")
  (tmp_path / "folder.bin").mkdir()
  with pytest.raises(LongLoraError, match="folder.bin: is a directory; pass "
                     "a .bin or .npy token file"):
    load_tokens(tmp_path / "folder.bin")


@pytest.mark.parametrize("chunk", [3, 1 << 24])  # Chunk by chunk, or at once.
def test_token_ids_are_checked_against_the_vocabulary(tmp_path, chunk):
  from longlora_jax.data.text import check_vocabulary
  ids = np.arange(20, dtype=np.int64) % 7
  check_vocabulary(ids, 7, "t", chunk=chunk)
  big, negative = ids.copy(), ids.astype(np.int32)
  big[11], big[15] = 7, 9
  negative[13] = -1
  with pytest.raises(LongLoraError) as error:
    check_vocabulary(big, 7, "t.npy", chunk=chunk)
  assert str(error.value) == (
      "t.npy: token id 7 at position 11 is outside the model's vocabulary "
      "of 7 (ids 0 to 6); tokenize the data with this model's tokenizer "
      "(python -m eval.pretokenize)")
  with pytest.raises(LongLoraError, match="token id -1 at position 13 is"):
    check_vocabulary(negative, 7, "t.npy", chunk=chunk)
  np.save(tmp_path / "neg.npy", negative)
  write_tokens(tmp_path / "big.bin", big)
  with pytest.raises(LongLoraError, match="big.bin: token id 7 at position "
                     "11 is outside the model's vocabulary of 7"):
    load_tokens(tmp_path / "big.bin", vocab_size=7)
  with pytest.raises(LongLoraError, match="neg.npy: token id -1 at "):
    document_tokens(str(tmp_path / "neg.npy"), vocab_size=7)
  assert len(load_tokens(tmp_path / "big.bin", vocab_size=10)) == 20


def test_text_sources(tmp_path):
  (tmp_path / "a.txt").write_text("first doc")
  (tmp_path / "b.jsonl").write_text(
      json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
  pq.write_table(pa.table({"text": ["fourth", "fifth"]}), tmp_path / "c.parquet")
  assert list(iter_texts(str(tmp_path))) == ["first doc", "second", "third",
                                             "fourth", "fifth"]
  assert list(iter_texts(str(tmp_path / "b.jsonl"))) == ["second", "third"]
  (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
  with pytest.raises(LongLoraError, match="record 1 has no 'text' field"):
    list(iter_texts(str(tmp_path / "bad.jsonl")))
  with pytest.raises(LongLoraError, match="no such file or directory"):
    list(iter_texts(str(tmp_path / "nope.txt")))


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
