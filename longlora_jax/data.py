"""Token streams: reading and writing flat token files, tokenising text.

A flat token file is the official LongLoRA/landmark-attention format: the
token ids of a corpus, one after another, as raw little-endian uint16
(`.bin`), or a NumPy `.npy` array (any integer dtype, e.g. for vocabularies
above 65,535).
"""

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from longlora_jax.errors import LongLoraError

TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".json", ".parquet")


def load_tokens(path: str | os.PathLike) -> np.ndarray:
  """A flat token file, memory-mapped (not read into memory)."""
  path = Path(path)
  if not path.exists():
    raise LongLoraError(f"{path}: no such file")
  if path.suffix == ".bin":
    if path.stat().st_size % 2:
      raise LongLoraError(f"{path}: odd size; a .bin token file is uint16")
    return np.memmap(path, dtype=np.uint16, mode="r")
  if path.suffix == ".npy":
    tokens = np.load(path, mmap_mode="r")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise LongLoraError(f"{path}: expected a 1-D integer array, got "
                          f"{tokens.dtype} {tokens.shape}")
    return tokens
  raise LongLoraError(f"{path}: not a token file (.bin or .npy)")


def write_tokens(path: str | os.PathLike, tokens: np.ndarray) -> Path:
  """Writes .bin (uint16) or .npy, via a temporary name."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tokens = np.asarray(tokens)
  tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
  if path.suffix == ".bin":
    if tokens.size and int(tokens.max()) > np.iinfo(np.uint16).max:
      raise LongLoraError(f"{path}: token ids above 65535 do not fit .bin "
                          "(uint16); write .npy instead")
    tokens.astype("<u2").tofile(tmp)
  elif path.suffix == ".npy":
    np.save(tmp, tokens.astype(np.uint32 if tokens.max(initial=0) > 65535
                               else np.uint16))
  else:
    raise LongLoraError(f"{path}: choose a .bin or .npy output")
  os.replace(tmp, path)
  return path


def iter_texts(source: str, *, text_field: str = "text",
               split: str = "train") -> Iterator[str]:
  """Documents from a text file, a directory of them, or a HF dataset name.

  Files: .txt/.md (one document per file), .jsonl/.json (the `text_field` of
  each record), .parquet (its `text_field` column).
  """
  path = Path(source)
  if path.is_dir():
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
    if not files:
      raise LongLoraError(f"{path}: no {'/'.join(TEXT_SUFFIXES)} files")
    for f in files:
      yield from iter_texts(str(f), text_field=text_field)
    return
  if path.exists():
    yield from _file_texts(path, text_field)
    return
  if not _looks_like_dataset(source):
    raise LongLoraError(f"{source}: no such file or directory")
  yield from _dataset_texts(source, text_field, split)


def _looks_like_dataset(name: str) -> bool:
  """"ORG/NAME" or "NAME": no file suffix, not a path."""
  return (name.count("/") <= 1 and not Path(name).suffix
          and not name.startswith((".", "/", "~")))


def _file_texts(path: Path, field: str) -> Iterator[str]:
  import json
  if path.suffix in (".txt", ".md"):
    yield path.read_text(encoding="utf-8", errors="replace")
  elif path.suffix in (".jsonl", ".json"):
    with open(path, encoding="utf-8") as f:
      if path.suffix == ".json":
        records = json.load(f)
        records = records if isinstance(records, list) else [records]
      else:
        records = (json.loads(line) for line in f if line.strip())
      for i, record in enumerate(records):
        if field not in record:
          raise LongLoraError(f"{path}: record {i} has no {field!r} field")
        yield record[field]
  elif path.suffix == ".parquet":
    import pyarrow.parquet as pq
    table = pq.read_table(path, columns=[field])
    yield from table.column(field).to_pylist()
  else:
    raise LongLoraError(f"{path}: unsupported file type {path.suffix!r}; use "
                        f"{', '.join(TEXT_SUFFIXES)}")


def _dataset_texts(name: str, field: str, split: str) -> Iterator[str]:
  import datasets
  try:
    ds = datasets.load_dataset(name, split=split, streaming=True)
  except Exception as e:  # datasets raises many types, all mean "cannot load"
    raise LongLoraError(
        f"dataset {name!r} cannot be loaded ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); pass a local file or "
        "directory, or check the name and your network/HF_DATASETS_OFFLINE") from None
  for record in ds:
    yield record[field]


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
