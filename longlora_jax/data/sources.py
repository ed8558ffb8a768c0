"""Reading training data: text files (.txt/.md, one document each), JSON
(.json: an array of records or one), JSON Lines (.jsonl), Parquet, a
directory of them, a Hugging Face dataset, and flat token files.

A flat token file is the official LongLoRA/landmark-attention format: the
token ids of a corpus, one after another, as raw little-endian uint16
(`.bin`), or a NumPy `.npy` array (any integer dtype, e.g. for vocabularies
above 65,535).

Damage is one line naming the file and, where the format tells, the
record, line or byte (`LongLoraError`); what can be seen on opening (size,
a .npy header, a Parquet footer and columns) is checked by `check_source`
before anything is read.
"""

import codecs
import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from longlora_jax.core.errors import LongLoraError

TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".parquet")
TOKEN_SUFFIXES = (".bin", ".npy")


def load_tokens(path: str | os.PathLike,
                vocab_size: int | None = None) -> np.ndarray:
  """A flat token file, memory-mapped (not read into memory) once its size
  (and a .npy's header) shows it whole; with `vocab_size`, every id is
  checked to lie in [0, vocab_size)."""
  path = Path(path)
  if path.is_dir():
    raise LongLoraError(f"{path}: is a directory; pass a .bin or .npy token "
                        "file (python -m eval.pretokenize writes one)")
  if not path.exists():
    raise LongLoraError(f"{path}: no such file")
  if path.suffix not in TOKEN_SUFFIXES:
    raise LongLoraError(f"{path}: not a token file (.bin or .npy)")
  with _reading(path):
    size = path.stat().st_size
    if not size:
      raise _damaged(path, "empty file (0 bytes), no tokens")
    if path.suffix == ".bin":
      if size % 2:
        raise _damaged(path, f"odd size ({size:,} bytes), so truncated or "
                       "not a token file (.bin is uint16, 2 bytes a token)")
      tokens = np.memmap(path, dtype="<u2", mode="r")
    else:
      tokens = _npy(path, size)
  if vocab_size is not None:
    check_vocabulary(tokens, vocab_size, str(path))
  return tokens


def _npy(path: Path, size: int) -> np.ndarray:
  """A .npy file's array, memory-mapped, after its header is read and the
  data it announces is found to be there."""
  fmt = np.lib.format
  with open(path, "rb") as f:
    try:
      version = fmt.read_magic(f)
      read = {(1, 0): fmt.read_array_header_1_0,
              (2, 0): fmt.read_array_header_2_0}[version]
      shape, _, dtype = read(f)
    except Exception as e:  # A damaged header fails in many ways, all this.
      raise _damaged(path, f"not a .npy array ({_one_line(e)})") from None
    offset = f.tell()
  if len(shape) != 1 or dtype.kind not in "iu":
    raise LongLoraError(
        f"{path}: holds {dtype} values of shape {shape}, not token ids (a "
        "1-D integer array); write one with python -m eval.pretokenize")
  need = shape[0] * dtype.itemsize
  if size - offset < need:
    raise _damaged(path, f"truncated: its header announces {shape[0]:,} "
                   f"tokens ({need:,} bytes of {dtype}), it holds "
                   f"{size - offset:,} bytes")
  if not need:
    return np.empty(0, dtype)
  return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def check_vocabulary(tokens: np.ndarray, vocab_size: int, source: str, *,
                     chunk: int = 1 << 24) -> None:
  """Raises LongLoraError naming the first id outside [0, vocab_size), its
  position and the vocabulary; reads `chunk` ids at a time."""
  for start in range(0, len(tokens), chunk):
    ids = np.asarray(tokens[start:start + chunk])
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
      i = int(np.argmax(bad))
      raise LongLoraError(
          f"{source}: token id {int(ids[i])} at position {start + i:,} is "
          f"outside the model's vocabulary of {vocab_size:,} (ids 0 to "
          f"{vocab_size - 1:,}); tokenize the data with this model's "
          "tokenizer (python -m eval.pretokenize)")


def iter_texts(source: str, *, text_field: str = "text",
               split: str = "train") -> Iterator[str]:
  """Documents from a text file, a directory of them, or a HF dataset name.

  Files: .txt/.md (one document per file), .jsonl/.json (the `text_field` of
  each record), .parquet (its `text_field` column).
  """
  for record in iter_records(source, fields=(text_field,), split=split):
    yield record[text_field]


def iter_records(source: str, *, fields: tuple[str, ...],
                 optional: tuple[str, ...] = (),
                 split: str = "train") -> Iterator[dict]:
  """Records (dicts) from files, a directory of them, or a HF dataset name
  (streamed); each must hold every name in `fields` as a string (and those
  in `optional`, where present and not null). A .txt/.md file is one
  record whose first field is the file's text. Hidden files and folders of
  a directory are passed over.

  Raises:
    LongLoraError: one line naming the file and where in it (record, line,
      byte) a file is damaged or a record is not what is asked.
  """
  path = Path(source)
  if path.is_dir():
    for f in _data_files(path):
      yield from iter_records(str(f), fields=fields, optional=optional)
    return
  if path.exists():
    records, where = _file_records(path, fields), str(path)
  elif _looks_like_dataset(source):
    records = ((None, r) for r in _dataset_records(source, split))
    where = f"dataset {source!r}"
  else:
    raise LongLoraError(f"{source}: no such file or directory")
  fix = "; fix or remove the file" if path.exists() else ""
  for i, (line, record) in enumerate(records, 1):
    at = f" at line {line}" if line else ""
    if not isinstance(record, dict):
      raise LongLoraError(f"{where}: record {i}{at} is {_kind(record)}, not "
                          f"an object with a {fields[0]!r} field{fix}")
    missing = [f for f in fields if f not in record]
    if missing:
      raise LongLoraError(f"{where}: record {i} has no {missing[0]!r} "
                          f"field{at} (it has "
                          f"{', '.join(map(repr, sorted(record))) or 'none'})")
    for name in (*fields, *optional):
      value = record.get(name)
      if not isinstance(value, str) and (name in fields or value is not None):
        raise LongLoraError(f"{where}: record {i}{at}: {name!r} is "
                            f"{_kind(value)}, not a string{fix}")
    yield record


def check_source(source: str, fields: tuple[str, ...] = ("text",)) -> None:
  """Fails now rather than when read on what opening a records source (as
  `iter_records` reads) shows: a missing source, an unsupported, empty or
  unreadable file, a Parquet footer and its `fields` columns; for a
  directory, of every file in it. Damage further in shows when read."""
  path = Path(source)
  if path.is_dir():
    for f in _data_files(path):
      _check_file(f, fields)
  elif path.exists():
    _check_file(path, fields)
  elif not _looks_like_dataset(source):
    raise LongLoraError(f"{source}: no such file or directory")


def _data_files(directory: Path) -> list[Path]:
  files = sorted(p for p in directory.rglob("*")
                 if p.suffix in TEXT_SUFFIXES and p.is_file() and not any(
                     part.startswith(".")
                     for part in p.relative_to(directory).parts))
  if not files:
    raise LongLoraError(f"{directory}: no {'/'.join(TEXT_SUFFIXES)} files")
  return files


def _looks_like_dataset(name: str) -> bool:
  """"ORG/NAME" or "NAME": no file suffix, not a path."""
  return (name.count("/") <= 1 and not Path(name).suffix
          and not name.startswith((".", "/", "~")))


# ---- reading files: each kind of damage one line naming where it is ----

def _damaged(path: Path, what: str) -> LongLoraError:
  return LongLoraError(f"{path}: {what}; fix or remove the file")


def _one_line(e: BaseException) -> str:
  lines = [l.strip().rstrip(":.") for l in str(e).splitlines() if l.strip()]
  return lines[0] if lines else type(e).__name__


def _kind(value) -> str:
  """How JSON names the type of `value`."""
  if value is None:
    return "null"
  for types, name in ((bool, "a boolean"), ((int, float), "a number"),
                      (str, "a string"), (list, "a list"), (dict, "an object")):
    if isinstance(value, types):
      return name
  return f"a {type(value).__name__}"


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
  """A refusal to read `path` (permissions, I/O) as one line."""
  try:
    yield
  except OSError as e:
    raise LongLoraError(f"{path}: cannot read it ({e.strerror or e})"
                        ) from None


def _check_file(path: Path, fields: tuple[str, ...]) -> None:
  """What can be checked of a text/records file without reading it."""
  if path.suffix not in TEXT_SUFFIXES:
    raise LongLoraError(f"{path}: unsupported file type {path.suffix!r}; use "
                        f"{', '.join(TEXT_SUFFIXES)}")
  with _reading(path):
    if not path.stat().st_size:
      raise _damaged(path, f"empty file (0 bytes), no {fields[0]} records")
    open(path, "rb").close()
  if path.suffix == ".parquet":
    _parquet_file(path, fields)


def _file_records(path: Path, fields: tuple[str, ...]
                  ) -> Iterator[tuple[int | None, object]]:
  """(line number or None, record) of a file, in order."""
  _check_file(path, fields)
  with _reading(path):
    if path.suffix in (".txt", ".md"):
      yield None, {fields[0]: _decode(path, path.read_bytes())}
    elif path.suffix == ".json":
      yield from ((None, r) for r in _json(path))
    elif path.suffix == ".jsonl":
      yield from _jsonl(path)
    else:
      yield from ((None, r) for r in _parquet(path, fields))


def _decode(path: Path, data: bytes, offset: int = 0,
            line: int | None = None) -> str:
  """UTF-8 `data` (found `offset` bytes into `path`) as text; a byte-order
  mark at the start of the file is dropped."""
  if not offset and data.startswith(codecs.BOM_UTF8):
    return _decode(path, data[3:], 3, line)
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    at = f" at line {line}," if line else " at"
    raise _damaged(path, f"not UTF-8 text{at} byte {offset + e.start:,} "
                   f"(0x{data[e.start]:02x})") from None


def _json_error(path: Path, e: json.JSONDecodeError, text: str, offset: int,
                line: int | None = None) -> LongLoraError:
  byte = offset + len(text[:e.pos].encode())
  return _damaged(path, f"not valid JSON at line {line or e.lineno}, column "
                  f"{e.colno} (byte {byte:,}): {e.msg}")


def _json(path: Path) -> list:
  data = path.read_bytes()
  text = _decode(path, data)
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise _json_error(path, e, text, len(data) - len(text.encode())
                      ) from None
  if isinstance(value, (list, dict)):
    return value if isinstance(value, list) else [value]
  raise _damaged(path, f"holds {_kind(value)}, not records (an array of "
                 "objects, or one object)")


def _jsonl(path: Path) -> Iterator[tuple[int, object]]:
  with open(path, "rb") as f:
    offset = 0
    for line, raw in enumerate(f, 1):
      if raw.strip():
        text = _decode(path, raw, offset, line)
        start = offset + len(raw) - len(text.encode())
        try:
          yield line, json.loads(text)
        except json.JSONDecodeError as e:
          raise _json_error(path, e, text, start, line) from None
      offset += len(raw)


def _parquet_file(path: Path, fields: tuple[str, ...]):
  """The opened Parquet file, its footer read and its `fields` found to be
  text columns; pages that carry a checksum are verified as they are read."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  try:
    file = pq.ParquetFile(path, page_checksum_verification=True)
  except (pa.ArrowException, OSError) as e:
    raise _damaged(path, f"not a readable Parquet file ({_one_line(e)})"
                   ) from None
  schema = file.schema_arrow
  for name in fields:
    if name not in schema.names:
      raise LongLoraError(f"{path}: no {name!r} column (it has "
                          f"{', '.join(map(repr, schema.names)) or 'none'})")
    kind = schema.field(name).type
    if pa.types.is_dictionary(kind):
      kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind)):
      raise LongLoraError(f"{path}: column {name!r} holds {kind}, not "
                          "strings")
  return file


def _parquet(path: Path, fields: tuple[str, ...]) -> Iterator[dict]:
  import pyarrow as pa
  batches, rows = _parquet_file(path, fields).iter_batches(batch_size=256), 0
  while True:
    try:
      batch = next(batches, None)
      records = [] if batch is None else batch.to_pylist()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
      raise _damaged(path, f"unreadable after record {rows:,} "
                     f"({_one_line(e)})") from None
    if batch is None:
      return
    rows += len(records)
    yield from records


def _dataset_records(name: str, split: str) -> Iterator[dict]:
  import datasets
  try:
    ds = datasets.load_dataset(name, split=split, streaming=True)
  except Exception as e:  # datasets raises many types, all mean "cannot load"
    raise LongLoraError(
        f"dataset {name!r} cannot be loaded ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); pass a local file or "
        "directory, or check the name and your network/HF_DATASETS_OFFLINE") from None
  yield from ds
