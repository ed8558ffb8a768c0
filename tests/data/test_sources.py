"""Reading data: every format, whole and damaged. Damage is one line naming
the file (and record, line or byte), found on opening where the format
allows; expected positions are counted by hand."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longlora_jax import LongLoraError
from longlora_jax.data.sources import (check_source, iter_records, iter_texts,
                                       load_tokens)
from longlora_jax.data.text import document_tokens, write_tokens

TEXTS = ["première ligne", "second", "drittes Dokument"]


def _fails(path, read, *patterns):
  """`read()` raises one line that starts with `path: ` and matches one of
  `patterns` after it."""
  with pytest.raises(LongLoraError) as error:
    read()
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"{path}: "), message
  rest = message[len(f"{path}: "):]
  assert any(re.match(p, rest) for p in patterns), message
  return rest


def _texts(path):
  return lambda: list(iter_texts(str(path)))


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
  from longlora_jax.data.sources import check_vocabulary
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




@pytest.mark.parametrize("suffix", [".txt", ".md", ".json", ".jsonl",
                                    ".parquet", ".bin", ".npy"])
def test_an_empty_file_of_any_format(tmp_path, suffix):
  path = tmp_path / f"data{suffix}"
  path.write_bytes(b"")
  if suffix in (".bin", ".npy"):
    assert _fails(path, lambda: load_tokens(path), ".*") == (
        "empty file (0 bytes), no tokens; fix or remove the file")
  else:
    for read in (lambda: check_source(str(path)), _texts(path)):
      assert _fails(path, read, ".*") == (
          "empty file (0 bytes), no text records; fix or remove the file")


def test_json_cut_anywhere(tmp_path):
  path = tmp_path / "train.json"
  data = json.dumps([{"text": t} for t in TEXTS], ensure_ascii=False,
                    indent=1).encode()
  path.write_bytes(data)
  assert list(iter_texts(str(path))) == TEXTS
  for cut in range(len(data)):
    path.write_bytes(data[:cut])
    rest = _fails(path, _texts(path), r"empty file \(0 bytes\)",
                  r"not valid JSON at line \d+, column \d+ \(byte \d+\): ",
                  r"not UTF-8 text at byte \d+ \(0x[0-9a-f]{2}\)")
    if byte := re.search(r"byte (\d+)", rest):
      assert int(byte[1]) <= cut  # Where it stopped, within what is there.
  # Counted by hand: line 1 is 17 bytes (é is 2) but 16 characters.
  path.write_text('[{"text": "é"},\n {"text": "b', encoding="utf-8")
  assert _fails(path, _texts(path), ".*") == (
      "not valid JSON at line 2, column 11 (byte 27): Unterminated string "
      "starting at; fix or remove the file")
  path.write_bytes(b'[{"text": "\xc3')  # Cut inside é.
  assert _fails(path, _texts(path), ".*") == (
      "not UTF-8 text at byte 11 (0xc3); fix or remove the file")


def test_jsonl_cut_anywhere(tmp_path):
  path = tmp_path / "train.jsonl"
  lines = [json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS]
  data = "".join(lines).encode()
  for cut in range(1, len(data) + 1):
    path.write_bytes(data[:cut])
    whole = data[:cut].count(b"\n")
    partial = data[:cut].split(b"\n")[-1]
    if not partial or partial == lines[whole].rstrip("\n").encode():
      # Cut where a line ends: the records before it, all of them valid.
      assert list(iter_texts(str(path))) == TEXTS[:whole + bool(partial)]
    else:
      _fails(path, _texts(path),
             rf"not (valid JSON|UTF-8 text) at line {whole + 1}, ")
  path.write_text('{"text": "a"}\n\n{"text": "b')
  assert _fails(path, _texts(path), ".*") == (
      "not valid JSON at line 3, column 10 (byte 24): Unterminated string "
      "starting at; fix or remove the file")
  path.write_bytes(b"\x1f\x8b\x08\x00")  # A gzip file by the wrong name.
  assert _fails(path, _texts(path), ".*") == (
      "not UTF-8 text at line 1, byte 1 (0x8b); fix or remove the file")


def test_text_files_are_utf8(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_bytes(b"caf\xc3\xa9 \xff")
  assert _fails(path, _texts(path), ".*") == (
      "not UTF-8 text at byte 6 (0xff); fix or remove the file")
  path = tmp_path / "notes.md"
  path.write_bytes(b"caf\xc3")
  assert _fails(path, _texts(path), ".*") == (
      "not UTF-8 text at byte 3 (0xc3); fix or remove the file")
  path.write_bytes(b"\xef\xbb\xbfab\xff")  # A byte-order mark is counted.
  _fails(path, _texts(path), r"not UTF-8 text at byte 5 \(0xff\)")
  path.write_bytes("\ufeffcafé".encode())
  assert list(iter_texts(str(path))) == ["café"]


def _parquet(path, table=None, **kwargs):
  pq.write_table(table or pa.table({"text": [f"document {i} " * 5
                                             for i in range(40)]}),
                 path, row_group_size=10, **kwargs)
  return path.read_bytes()


def test_parquet_cut_or_unlike_parquet_fails_on_opening(tmp_path):
  path = tmp_path / "train.parquet"
  data = _parquet(path)
  for cut in [*range(0, len(data), 37), len(data) - 1]:
    path.write_bytes(data[:cut])
    for read in (lambda: check_source(str(path)), _texts(path)):
      _fails(path, read, r"empty file \(0 bytes\)",
             r"not a readable Parquet file \(.+\); fix or remove the file$")
  path.write_bytes(data[:-4] + b"PAR0")
  assert _fails(path, lambda: check_source(str(path)), ".*") == (
      "not a readable Parquet file (Parquet magic bytes not found in footer. "
      "Either the file is corrupted or this is not a parquet file); fix or "
      "remove the file")


def test_parquet_pages_with_checksums_are_verified(tmp_path):
  path = tmp_path / "train.parquet"
  data = _parquet(path, write_page_checksum=True)
  chunk = pq.ParquetFile(path).metadata.row_group(2).column(0)
  end = chunk.data_page_offset + chunk.total_compressed_size
  for at in range(end - 20, end):  # In the third row group's data.
    damaged = bytearray(data)
    damaged[at] ^= 0xff
    path.write_bytes(bytes(damaged))
    check_source(str(path))  # The footer is whole.
    _fails(path, _texts(path), r"unreadable after record \d+ \(.+\); fix or "
           "remove the file$")


def test_records_hold_their_fields_as_strings(tmp_path):
  cases = {
      "a.json": ('[{"text": "a"}, {"text": 3}]',
                 "record 2: 'text' is a number, not a string; fix or remove "
                 "the file"),
      "b.json": ('[{"text": "a"}, "b"]', "record 2 is a string, not an "
                 "object with a 'text' field; fix or remove the file"),
      "c.json": ('"just text"', "holds a string, not records (an array of "
                 "objects, or one object); fix or remove the file"),
      "d.jsonl": ('{"text": "a"}\n{"text": null}\n', "record 2 at line 2: "
                  "'text' is null, not a string; fix or remove the file"),
      "e.jsonl": ('{"text": "a"}\n\n{"body": "x"}\n', "record 2 has no "
                  "'text' field at line 3 (it has 'body')"),
      "f.jsonl": ('[1, 2]\n', "record 1 at line 1 is a list, not an object "
                  "with a 'text' field; fix or remove the file"),
  }
  for name, (content, message) in cases.items():
    (tmp_path / name).write_text(content)
    assert _fails(tmp_path / name, _texts(tmp_path / name), ".*") == message
  tables = {
      "g.parquet": (pa.table({"body": ["x"]}), "no 'text' column (it has "
                    "'body')"),
      "h.parquet": (pa.table({"text": [1, 2]}), "column 'text' holds int64, "
                    "not strings"),
  }
  for name, (table, message) in tables.items():
    pq.write_table(table, tmp_path / name)
    assert _fails(tmp_path / name, lambda: check_source(
        str(tmp_path / name)), ".*") == message
  pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "i.parquet")
  assert _fails(tmp_path / "i.parquet", _texts(tmp_path / "i.parquet"),
                ".*") == ("record 2: 'text' is null, not a string; fix or "
                          "remove the file")
  # Categorical text (as pandas writes it) is text.
  pq.write_table(pa.table({"text": pa.array(["a", "b", "a"]).dictionary_encode()}),
                 tmp_path / "j.parquet")
  assert list(iter_texts(str(tmp_path / "j.parquet"))) == ["a", "b", "a"]
  # An optional field may be absent or null, else a string.
  (tmp_path / "k.jsonl").write_text(
      '{"q": "a", "hint": null}\n{"q": "b"}\n{"q": "c", "hint": 7}\n')
  read = lambda: list(iter_records(str(tmp_path / "k.jsonl"), fields=("q",),
                                   optional=("hint",)))
  assert _fails(tmp_path / "k.jsonl", read, ".*") == (
      "record 3 at line 3: 'hint' is a number, not a string; fix or remove "
      "the file")


def test_npy_cut_anywhere_or_not_token_ids(tmp_path):
  path = tmp_path / "tokens.npy"
  np.save(path, np.arange(50, dtype=np.uint16))
  data = path.read_bytes()
  for cut in range(len(data)):
    path.write_bytes(data[:cut])
    _fails(path, lambda: load_tokens(path), r"empty file \(0 bytes\), no tokens",
           r"not a \.npy array \(.+\); fix or remove the file$",
           r"truncated: its header announces 50 tokens \(100 bytes of "
           r"uint16\), it holds \d+ bytes; fix or remove the file$")
  path.write_bytes(b"PK\x03\x04" + data[4:])
  _fails(path, lambda: load_tokens(path), re.escape(
      "not a .npy array (the magic string is not correct; expected "
      "b'\\x93NUMPY', got b'PK\\x03\\x04PY'); fix or remove the file"))
  for array in (np.zeros(3, np.float32), np.zeros((2, 3), np.int32),
                np.zeros(3, bool), np.array(["x"], object)):
    np.save(path, array, allow_pickle=True)
    assert _fails(path, lambda: load_tokens(path), ".*") == (
        f"holds {array.dtype} values of shape {array.shape}, not token ids "
        "(a 1-D integer array); write one with python -m eval.pretokenize")


def test_bin_cut_anywhere(tmp_path):
  path = tmp_path / "tokens.bin"
  tokens = np.arange(20, dtype=np.uint16) * 1000
  data = write_tokens(path, tokens).read_bytes()
  for cut in range(1, len(data)):
    path.write_bytes(data[:cut])
    if cut % 2:
      assert _fails(path, lambda: load_tokens(path), ".*") == (
          f"odd size ({cut} bytes), so truncated or not a token file (.bin "
          "is uint16, 2 bytes a token); fix or remove the file")
    else:  # A .bin has no header: a cut at a token boundary is a shorter file.
      np.testing.assert_array_equal(load_tokens(path), tokens[:cut // 2])


def test_a_directory_names_its_damaged_file(tmp_path):
  (tmp_path / "a.txt").write_text("first")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.jsonl").write_text('{"text": "second"}\n')
  # Hidden files are passed over: macOS's "._" companions, caches.
  (tmp_path / "._a.json").write_bytes(b"\x00\x05\x16\x07\xff")
  (tmp_path / ".cache").mkdir()
  (tmp_path / ".cache" / "x.jsonl").write_bytes(b"\xff")
  cut = tmp_path / "sub" / "c.parquet"
  cut.write_bytes(_parquet(cut)[:100])
  for read in (lambda: check_source(str(tmp_path)), _texts(tmp_path)):
    _fails(cut, read, r"not a readable Parquet file")
  cut.unlink()
  assert list(iter_texts(str(tmp_path))) == ["first", "second"]
  (tmp_path / "d.json").write_text('[{"text": "third"')
  check_source(str(tmp_path))  # JSON shows its damage only when read.
  _fails(tmp_path / "d.json", _texts(tmp_path),
         r"not valid JSON at line 1, column 18 \(byte 17\)")
