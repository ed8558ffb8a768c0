import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longlora_jax import LongLoraError
from longlora_jax.data import (iter_texts, load_tokens, tokenize_documents,
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


def test_text_sources(tmp_path):
  (tmp_path / "a.txt").write_text("first doc")
  (tmp_path / "b.jsonl").write_text(
      json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
  pq.write_table(pa.table({"text": ["fourth", "fifth"]}), tmp_path / "c.parquet")
  assert list(iter_texts(str(tmp_path))) == ["first doc", "second", "third",
                                             "fourth", "fifth"]
  assert list(iter_texts(str(tmp_path / "b.jsonl"))) == ["second", "third"]
  (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
  with pytest.raises(LongLoraError, match="record 0 has no 'text' field"):
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
