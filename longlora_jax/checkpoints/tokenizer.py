"""A checkpoint's tokenizer as a transformers tokenizer, and its files for
an export.

Hugging Face tokenizer files load as they are. Meta's releases ship
`tokenizer.model` alone, in one of two formats told apart by content: a
SentencePiece model (Llama 1 and 2, Code Llama), or Llama 3's tiktoken BPE
file (lines of `base64(token) rank`), which is rebuilt here as a
`tokenizers` byte-level BPE encoding exactly as Meta's
`llama_models.llama3.tokenizer.Tokenizer` does, tiktoken not needed.
"""

import base64
import binascii
import functools
import json
import os
import re
import shutil
from pathlib import Path

from longlora_jax.core.errors import CheckpointError
from longlora_jax.core.files import write_json

TIKTOKEN, SENTENCEPIECE = "tiktoken", "sentencepiece"
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=*[ \t]+\d+(?:\r?\n|\Z)")

# Meta's Llama 3 split of text into pieces before BPE (llama3/tokenizer.py).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
                  r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                  r"\s+(?!\S)|\s+")
# Meta's 256 special tokens, ids from the number of ranks on, in its order.
_NAMED = ("<|begin_of_text|>", "<|end_of_text|>",
          "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
          "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
          "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
          "<|image|>")
LLAMA3_SPECIAL = _NAMED + tuple(f"<|reserved_special_token_{i}|>"
                                for i in range(2, 256 - len(_NAMED) + 2))
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# What Meta's generation stops on (Tokenizer.stop_tokens): the end of a
# document, of a message (a tool call follows) and of a turn.
LLAMA3_STOP = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
# Meta's encode cuts the text into 400,000-character chunks, then each
# chunk where a run of whitespace or of non-whitespace (str.isspace) passes
# 25,000 characters, and encodes the parts apart (its guard against a
# tiktoken crash); the cuts change the tokens at them, so they are made
# here too. \G continues at the previous cut, so a run is cut every 25,000
# characters from its start, and only where the run goes on.
_SPACE = (r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f"
          r"\u205f\u3000")
_CHUNKS = r"\G(?:[\s\S]{100000}){4}"  # Oniguruma repeats at most 100,000
_RUNS = "|".join(rf"(?:(?<![{c}])|\G)[{c}]{{25000}}(?=[{c}])"
                 for c in (f"^{_SPACE}", _SPACE))


def model_format(file: Path) -> str:
  """TIKTOKEN or SENTENCEPIECE: which `file` (a tokenizer.model) is, from
  its content; CheckpointError naming the file when it is neither."""
  data = Path(file).read_bytes()
  if _TIKTOKEN_LINE.match(data):
    return TIKTOKEN
  import sentencepiece
  try:
    sentencepiece.SentencePieceProcessor(model_proto=data)
  except (RuntimeError, OSError, TypeError):
    raise CheckpointError(
        f"{file}: neither a SentencePiece model (Llama 1/2, Code Llama) nor "
        "a tiktoken BPE file (Llama 3); download the release's "
        "tokenizer.model again") from None
  return SENTENCEPIECE


def read_ranks(file: Path) -> dict[bytes, int]:
  """A tiktoken file's ranks, token bytes -> rank; CheckpointError at the
  first malformed line, or unless the ranks are 0 to n-1 once each (Meta
  numbers the special tokens from n on)."""
  ranks = {}
  for number, line in enumerate(Path(file).read_bytes().splitlines(), 1):
    if not line.strip():
      continue
    try:
      token, rank = line.split()
      ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, binascii.Error):
      raise CheckpointError(f"{file}:{number}: not a `base64(token) rank` "
                            "line of a tiktoken BPE file") from None
  if sorted(ranks.values()) != list(range(len(ranks))):
    raise CheckpointError(f"{file}: its ranks are not 0 to {len(ranks) - 1} "
                          "once each")
  return ranks


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
  """The merge list equivalent to tiktoken's BPE over `ranks`, in rank order.

  tiktoken repeatedly joins the adjacent pair whose bytes have the lowest
  rank. A token of rank r forms only where its bytes hold exactly two parts
  and no pair in them ranks below r; as no merge crosses its edges, those
  parts are what BPE on its bytes alone makes from the merges below r. So
  each token has one merge, that split, ranked r. A token whose bytes do
  not come to two parts that way never forms by merging; it is used only
  for a whole piece, which the BPE model's `ignore_merges` matches first,
  as tiktoken does.
  """
  merges = []
  for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
      best, at = rank, -1
      for i in range(len(parts) - 1):
        r = ranks.get(parts[i] + parts[i + 1], rank)
        if r < best:  # the leftmost of equals, as tiktoken
          best, at = r, i
      if at < 0:
        break
      parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) == 2:
      merges.append((parts[0], parts[1]))
  return merges


@functools.cache
def _byte_chars() -> list[str]:
  """GPT-2's byte-level alphabet: byte b as a printable character (the
  printable Latin-1 bytes as themselves, the rest from U+0100 on)."""
  keep = [*range(0x21, 0x7f), *range(0xa1, 0xad), *range(0xae, 0x100)]
  chars, extra = {b: chr(b) for b in keep}, 0
  for b in range(256):
    if b not in chars:
      chars[b], extra = chr(0x100 + extra), extra + 1
  return [chars[b] for b in range(256)]


def llama3_backend(file: Path):
  """Meta's Llama 3 tokenizer.model as a `tokenizers.Tokenizer`: the ranks
  as a byte-level BPE (`bpe_merges`), Meta's cuts and split pattern, its
  special tokens, and BOS before each text."""
  from tokenizers import Tokenizer
  stat = os.stat(file)
  return Tokenizer.from_str(_llama3_json(str(Path(file).resolve()),
                                         stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=2)  # building it takes seconds
def _llama3_json(path: str, mtime: int, size: int) -> str:
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models
  from tokenizers import pre_tokenizers as pre, processors
  ranks = read_ranks(Path(path))
  missing = [b for b in range(256) if bytes([b]) not in ranks]
  if missing:
    raise CheckpointError(f"{path}: lacks {len(missing)} single-byte tokens "
                          f"(byte {missing[0]} first); not a byte-level BPE")
  chars = _byte_chars()
  text = lambda token: "".join(chars[b] for b in token)
  tokenizer = Tokenizer(models.BPE(
      {text(t): r for t, r in ranks.items()},
      [(text(a), text(b)) for a, b in bpe_merges(ranks)],
      fuse_unk=False, ignore_merges=True))
  tokenizer.pre_tokenizer = pre.Sequence([
      pre.Split(Regex(_CHUNKS), behavior="isolated"),
      pre.Split(Regex(_RUNS), behavior="merged_with_previous"),
      pre.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
      pre.ByteLevel(add_prefix_space=False, use_regex=False)])
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t in LLAMA3_SPECIAL])
  tokenizer.post_processor = processors.Sequence([
      processors.ByteLevel(add_prefix_space=False, trim_offsets=False),
      processors.TemplateProcessing(
          single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1",
          special_tokens=[(BOS, len(ranks))])])
  return tokenizer.to_str()


def llama3_tokenizer(file: str | os.PathLike):
  """Meta's Llama 3 tokenizer.model (tiktoken ranks) as a transformers
  `PreTrainedTokenizerFast`, encoding as Meta's `Tokenizer.encode(text,
  bos=True, eos=False, allowed_special="all")`; with
  `split_special_tokens=True`, as its default (special tokens written in
  the text encoded as text). Meta's allowed_special subsets have no
  counterpart. One difference remains: where special tokens are read as
  such, Meta's 400,000-character chunks and 25,000-character runs count
  across them, ours restart after each.

  bos `<|begin_of_text|>`, prepended to each text; eos `<|end_of_text|>`,
  what Meta's `encode(eos=True)` appends and a document ends with. Meta's
  generation also stops at `<|eom_id|>` and `<|eot_id|>` (LLAMA3_STOP),
  which an instruct model ends its turns with: generation takes them from
  the config (`meta.read_config`). No pad token, as Meta's Hugging Face
  tokenizers.
  """
  import transformers
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=llama3_backend(Path(file)), bos_token=BOS,
      eos_token=EOS, clean_up_tokenization_spaces=False)


def load_tokenizer(directory: str | os.PathLike):
  """transformers' tokenizer of a directory (a checkpoint, or tokenizer
  files alone): its tokenizer.json when there is one; otherwise its
  tokenizer.model, Meta's Llama 3 tiktoken file (`llama3_tokenizer`) or a
  SentencePiece model, encoded as SentencePiece does with BOS (what Meta
  ships, and the official LongLoRA merge script saves)."""
  import transformers
  directory = Path(directory)
  config_file = directory / "tokenizer_config.json"
  model = directory / "tokenizer.model"
  try:
    if model.exists() and not (directory / "tokenizer.json").exists():
      if model_format(model) == TIKTOKEN:
        return llama3_tokenizer(model)
      # transformers 5's LlamaTokenizer ranks the BPE merges it builds from
      # tokenizer.model by piece id, not score, so "▁▁" merges first and
      # runs of spaces encode differently; its generic backend follows the
      # SentencePiece model (transformers 4 lacks it and needs it not).
      # legacy=True encodes each text between special tokens as
      # SentencePiece does, leading spaces included. Llama prepends BOS.
      backend = getattr(transformers, "TokenizersBackend",
                        transformers.AutoTokenizer)
      configured = config_file.exists() and "add_bos_token" in json.loads(
          config_file.read_text())
      return backend.from_pretrained(
          directory, legacy=True,
          **({} if configured else {"add_bos_token": True}))
    return transformers.AutoTokenizer.from_pretrained(directory)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{directory}: no usable tokenizer ({e})") from None


def rebuilt_for_export(directory: Path) -> bool:
  """Whether an export writes the tokenizer files of `directory` anew
  (`save_tokenizer`) rather than copying them: tokenizer.model without
  tokenizer.json, which transformers reads differently (or, for
  tiktoken, not at all)."""
  return ((directory / "tokenizer.model").exists()
          and not (directory / "tokenizer.json").exists())


def save_tokenizer(tokenizer, directory: Path, source: Path | None = None
                   ) -> None:
  """Writes `tokenizer` (a transformers fast tokenizer) into `directory` as
  tokenizer.json, tokenizer_config.json and special_tokens_map.json, from
  which `AutoTokenizer.from_pretrained` loads a tokenizer encoding the same
  ids (as PreTrainedTokenizerFast, the class transformers 4 and 5 both
  name, its special tokens in both files); and the `source` directory's
  tokenizer.model beside them when it is SentencePiece (tools such as
  converters read it; a tiktoken file no Hugging Face loader reads)."""
  directory = Path(directory)
  tokenizer.backend_tokenizer.save(str(directory / "tokenizer.json"))
  special = {name: str(value) for name in ("bos_token", "eos_token",
                                           "unk_token", "pad_token")
             if (value := getattr(tokenizer, name, None)) is not None}
  config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
            "clean_up_tokenization_spaces": bool(
                tokenizer.clean_up_tokenization_spaces),
            "model_max_length": tokenizer.model_max_length,
            "padding_side": tokenizer.padding_side}
  if getattr(tokenizer, "chat_template", None):
    config["chat_template"] = tokenizer.chat_template
  write_json(directory / "tokenizer_config.json", config)
  write_json(directory / "special_tokens_map.json", special)
  model = Path(source) / "tokenizer.model" if source is not None else None
  if model is not None and model.exists() and (
      model_format(model) == SENTENCEPIECE):
    shutil.copyfile(model, directory / "tokenizer.model")
