"""The built-in demo: a tiny pretrained Llama and its data (its evaluation:
`demo_report`).

The base model is the project's own: a byte-level Llama with a native
context of 256 tokens, pretrained by `python -m train.pretrain_demo` on the
Python standard library's source (text every machine with Python has) and
shipped as the built-in checkpoint `demo`
(`longlora_jax/checkpoints/builtin/demo/`). `python -m train.extend` with no
arguments extends it to 1024 tokens on a laptop CPU.

The standard library splits by a hash of each file's path: 1 in 20 files is
held out for evaluation and never trained on; the rest is training data.
"""

import json
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from longlora_jax.model.config import LlamaConfig
from longlora_jax.core.errors import LongLoraError
from longlora_jax.core.files import atomic_path, write_json

DATA_DIR = Path("runs") / "demo" / "data"
# 256 byte tokens after the three specials.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
NATIVE_CONTEXT = 256
DEMO_CONFIG = LlamaConfig(
    vocab_size=256 + len(SPECIAL_TOKENS), hidden_size=128,
    intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
    max_position_embeddings=NATIVE_CONTEXT, bos_token_id=1, eos_token_id=2,
    pad_token_id=0, tie_word_embeddings=False)
# Directories of the standard library that are not its own prose and code:
# installed packages (differ per machine), test suites, codec tables.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test",
              "encodings", "__pycache__"}
_HELD_OUT_ONE_IN = 20


def save_byte_tokenizer(directory: Path) -> None:
  """A byte-level tokenizer: one token per UTF-8 byte, BOS first.

  Like Llama's SentencePiece tokenizer it prepends a space to the text (and
  the decoder removes it), so "12345" alone encodes as the " 12345" that
  follows "The pass key is": the passkey protocol compares those ids.
  """
  from tokenizers import (Tokenizer, decoders, models, normalizers,
                          pre_tokenizers, processors)
  from transformers import PreTrainedTokenizerFast
  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
  for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
    vocab[ch] = len(vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.normalizer = normalizers.Prepend(" ")
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                               use_regex=False)
  tok.decoder = decoders.Sequence([decoders.ByteLevel(),
                                   decoders.Strip(" ", 1, 0)])
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                 bos_token="<s>", eos_token="</s>")
  fast.save_pretrained(directory)
  # A class every transformers release knows (5.x writes its own name).
  config_file = Path(directory) / "tokenizer_config.json"
  cfg = json.loads(config_file.read_text())
  write_json(config_file, {**cfg, "tokenizer_class": "PreTrainedTokenizerFast"})


# ---- data: the standard library's source ----

def stdlib_files() -> tuple[list[Path], list[Path]]:
  """(training files, held-out files) of this Python's standard library."""
  root = Path(sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in root.rglob("*.py")
                 if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
  if len(files) < 100:
    raise LongLoraError(
        f"{root}: found {len(files)} Python source files; the demo trains on "
        "the standard library's source, which this Python does not ship")
  held = lambda p: zlib.crc32(p.relative_to(root).as_posix().encode()) % (
      _HELD_OUT_ONE_IN) == 0
  return ([p for p in files if not held(p)], [p for p in files if held(p)])


def demo_data(directory: str | os.PathLike = DATA_DIR,
              seed: int = 0) -> tuple[Path, Path]:
  """(train.jsonl, heldout.jsonl): the standard library split, one
  {"text", "path"} record per file, training files in a seeded order."""
  directory = Path(directory)
  out = directory / "train.jsonl", directory / "heldout.jsonl"
  if all(p.exists() for p in out):
    return out
  train, held = stdlib_files()
  train = [train[i] for i in np.random.default_rng(seed).permutation(len(train))]
  directory.mkdir(parents=True, exist_ok=True)
  for path, files in zip(out, (train, held)):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
      for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        f.write(json.dumps({"text": text, "path": p.name}) + "\n")
  return out
