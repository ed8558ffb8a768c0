"""Meta's tokenizer.model as we load it, against Meta's own tokenizers: Llama
3's `llama_models.llama3.tokenizer.Tokenizer` (tiktoken) on the file
llama-models ships, and SentencePiece on the real Llama 2 model; and the
files an export writes, loaded back by transformers."""

import base64
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece
import transformers

from longlora_jax.core.errors import CheckpointError
from longlora_jax.checkpoints import tokenizer as tok_io
from longlora_jax.checkpoints.checkpoint import Checkpoint
from longlora_jax.checkpoints.tokenizer import load_tokenizer
from tests.conftest import SHARED_TOKENIZER

_SPECIAL = ("<|begin_of_text|>You are<|eot_id|><|start_header_id|>user"
            "<|end_header_id|>\n\nHi<|eot_id|> <|eom_id|><|python_tag|>x "
            "<|reserved_special_token_247|><|eot_id|<|end_of_text|>")
TEXTS = [
    "", " ", "\n", "a  b   c\n\n\n   d", "\t\t  \n \r\n  \r\r\n  x",
    "   leading", "trailing   \n", "line1\nline2\n\n  line3 \n",
    "def f(x):\n    if x:\n        return {'a': [1, 2]}\n    return None\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
    '{"key": "value", "n": 12, "list": [true, null]}',
    "人工智能正在改变世界。我们在北京见面吧！", "日本語のテキスト、カタカナとひらがな。",
    "مرحبا بالعالم، كيف حالك اليوم؟", "नमस्ते दुनिया, आप कैसे हैं?",
    "Привет, мир! Как дела? Ёлка и щётка.", "한국어 텍스트 ภาษาไทย Ελληνικά",
    "emoji 🤗🚀 family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 thumbs 👍🏽 heart ❤️ "
    "keycap 1️⃣ \u200d\u200d",
    "12345678 1,234,567.891 3.14159 2024-01-01 0007 ١٢٣٤٥ ४५६ ½ ² 10^100",
    "I'M here, you'LL see, they're, He's, WE'VE, it'd, she'S",
    "nbsp\u00a0ideographic\u3000sep\u2028para\u2029fs\x1c\x85nel\u200bzw",
    "e\u0301 café naïve Ｆｕｌｌ ﬁ ß ǅ", "\x00\x01\x7f\ufeff\ufffd\U0010ffff",
    _SPECIAL, "<|eot_id|" + "|>" + "<<|eot_id|>>",
]


def _document(size: int, seed: int = 0) -> str:
  """A long mixed document: the texts above, shuffled and joined."""
  rng, parts, n = random.Random(seed), [], 0
  while n < size:
    part = rng.choice(TEXTS) + rng.choice(["", " ", "\n", "\n\n", "  "])
    parts.append(part)
    n += len(part)
  return "".join(parts)


def _llama3_model() -> Path:
  """The Llama 3 tokenizer.model that llama-models ships."""
  module = pytest.importorskip("llama_models.llama3.tokenizer",
                               reason="needs llama-models (Meta's tokenizer)")
  return Path(module.__file__).parent / "tokenizer.model"


@pytest.fixture(scope="module")
def meta3():
  """Meta's Llama 3 tokenizer (it needs tiktoken, not torch)."""
  model = _llama3_model()  # skips without llama-models
  from llama_models.llama3.tokenizer import Tokenizer
  return Tokenizer(model)


@pytest.fixture(scope="module")
def ours3(meta3, tmp_path_factory):
  """Ours, from a directory holding Meta's tokenizer.model alone."""
  directory = tmp_path_factory.mktemp("llama3")
  shutil.copy(_llama3_model(), directory / "tokenizer.model")
  return load_tokenizer(directory)


def _equal_meta(ours, meta3, texts):
  for text in texts:
    allowed = meta3.encode(text, bos=True, eos=False, allowed_special="all")
    plain = meta3.encode(text, bos=True, eos=False)
    assert ours(text)["input_ids"] == allowed, text[:80]
    assert ours(text, split_special_tokens=True)["input_ids"] == plain, (
        text[:80])
    assert ours.decode(allowed) == meta3.decode(allowed) == (
        "<|begin_of_text|>" + text), text[:80]
    assert ours.decode(plain, skip_special_tokens=True) == text, text[:80]


def test_llama3_encodes_as_meta(ours3, meta3):
  _equal_meta(ours3, meta3, TEXTS + [_document(50_000)])
  assert ours3(TEXTS, add_special_tokens=False)["input_ids"] == [
      meta3.encode(t, bos=False, eos=False, allowed_special="all")
      for t in TEXTS]


def test_llama3_random_text_encodes_as_meta(ours3, meta3):
  rng = random.Random(1)
  alphabet = [*" \t\n\r\u00a0\u3000'sSdLlVvE0123456789.,;:!?()[]{}<>|_-+=*/"
              "\\\"#@$%^&~`éß日本語العربيةहिन्दीрусский🤗\u200d\u0301\x1c\x85",
              "👨‍👩‍👧", "'ll", "'RE", "<|eot_id|>", "<|begin_of_text|>"]
  texts = ["".join(rng.choices(alphabet, k=rng.randint(1, 40)))
           for _ in range(3000)]
  for text in texts:
    assert ours3(text)["input_ids"] == meta3.encode(
        text, bos=True, eos=False, allowed_special="all"), text
    assert ours3(text, split_special_tokens=True)["input_ids"] == (
        meta3.encode(text, bos=True, eos=False)), text


def test_llama3_each_character_encodes_as_meta(ours3, meta3):
  # Every code point below U+3400 (Latin to CJK symbols: the scripts,
  # spaces and punctuation the split pattern tells apart), every 61st
  # above, in contexts where each pattern branch meets it.
  points = [*range(0x3400), *range(0x3400, 0x110000, 61)]
  chars = [chr(c) for c in points if not 0xd800 <= c < 0xe000]
  for i in range(0, len(chars), 2000):
    text = "".join(f"a{c}b {c}1{c}{c}\n" for c in chars[i:i + 2000])
    assert ours3(text, split_special_tokens=True)["input_ids"] == (
        meta3.encode(text, bos=True, eos=False)), i


def test_llama3_long_runs_and_chunks_are_cut_as_meta(ours3, meta3):
  # Meta's encode cuts runs past 25,000 characters and the text every
  # 400,000; the tokens at the cuts follow them.
  texts = ["x" * 25_000 + " y", "x" * 25_001 + " y", "word" * 20_000,
           " " * 60_000 + "z", "a" + "\n" * 50_000 + "b", "ab" * 200_001,
           _document(900_000, seed=2) + "q" * 30_000 + _document(10)]
  for text in texts:
    assert ours3(text, split_special_tokens=True)["input_ids"] == (
        meta3.encode(text, bos=True, eos=False)), len(text)


def test_llama3_special_tokens_and_stops(ours3, meta3):
  assert len(ours3) == meta3.n_words == 128256
  assert {t: ours3.convert_tokens_to_ids(t)
          for t in meta3.special_tokens} == meta3.special_tokens
  assert (ours3.bos_token_id, ours3.eos_token_id) == (meta3.bos_id,
                                                       meta3.eos_id)
  assert ours3.convert_tokens_to_ids(list(tok_io.LLAMA3_STOP)) == (
      meta3.stop_tokens)
  assert ours3.pad_token is None


def _tiktoken_file(path: Path, extra: list[bytes]) -> dict[bytes, int]:
  ranks = {bytes([b]): b for b in range(256)}
  ranks.update({t: 256 + i for i, t in enumerate(extra)})
  path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r
                            for t, r in ranks.items()))
  return ranks


def test_merges_by_hand(tmp_path):
  # "abc" (rank 259) forms from ab + c: BPE on its bytes joins "ab" (257)
  # before "bc" (258). "cab" from c + ab. "acb" has no pair to join, so it
  # never forms by merging (only as a whole piece).
  ranks = _tiktoken_file(tmp_path / "t.model", [b"xy", b"ab", b"bc", b"abc",
                                                  b"cab", b"acb"])
  merges = tok_io.bpe_merges(ranks)
  assert merges == [(b"x", b"y"), (b"a", b"b"), (b"b", b"c"), (b"ab", b"c"),
                    (b"c", b"ab")]


def test_merges_encode_as_tiktoken(tmp_path):
  # A small vocabulary whose tokens form in more ways than one (aba from
  # ab + a or a + ba), some only as whole pieces: tiktoken's BPE on it.
  tiktoken = pytest.importorskip("tiktoken")
  extra = [b"ab", b"ba", b"aba", b"bab", b"abab", b"bb", b"aab", b"bba",
           b"abba", b"aaa", b"bbbb", b"baab", b"ababab", b"aabb", b"bbab"]
  ranks = _tiktoken_file(tmp_path / "tokenizer.model", extra)
  reference = tiktoken.Encoding("t", pat_str=tok_io.LLAMA3_PATTERN,
                                mergeable_ranks=ranks, special_tokens={})
  ours = load_tokenizer(tmp_path)
  rng = random.Random(3)
  for _ in range(3000):
    text = "".join(rng.choices("ab b", k=rng.randint(1, 16)))
    assert ours(text, add_special_tokens=False)["input_ids"] == (
        reference.encode_ordinary(text)), text


@pytest.mark.parametrize("content,message", [
    (b"\x00\x01garbage", r"tokenizer.model: neither a SentencePiece model "
     r"\(Llama 1/2, Code Llama\) nor a tiktoken BPE file \(Llama 3\)"),
    (b"IQ== 0\nIg== 1\n%%% 2\n", r"tokenizer.model:3: not a `base64\(token\) "
     r"rank` line"),
    (b"IQ== 0\nIg== 2\n", r"tokenizer.model: its ranks are not 0 to 1"),
    (b"IQ== 0\nIg== 1\n", r"tokenizer.model: lacks 254 single-byte tokens "
     r"\(byte 0 first\)"),
])
def test_unusable_tokenizer_model(tmp_path, content, message):
  (tmp_path / "tokenizer.model").write_bytes(content)
  with pytest.raises(CheckpointError, match=message) as e:
    load_tokenizer(tmp_path)
  assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def ours_sp(sp, tmp_path_factory):
  """Ours, from a directory holding the Llama 2 tokenizer.model alone, as
  Meta ships it."""
  directory = tmp_path_factory.mktemp("llama2")
  shutil.copy(os.path.join(SHARED_TOKENIZER, "tokenizer.model"), directory)
  return load_tokenizer(directory)


def test_sentencepiece_encodes_as_sentencepiece(ours_sp, sp):
  # SentencePiece never reads "<s>" in a text as BOS; transformers does
  # unless split_special_tokens.
  plain = [t for t in TEXTS if "<" not in t] + [_document(20_000)]
  for text in plain:
    assert ours_sp(text)["input_ids"] == [1] + sp.encode(text), text[:80]
  for text in TEXTS + ["<s> hi </s>"]:
    ids = ours_sp(text, split_special_tokens=True)["input_ids"]
    assert ids == [1] + sp.encode(text), text[:80]
    assert ours_sp.decode(ids, skip_special_tokens=True) == sp.decode(
        sp.encode(text)), text[:80]
  assert (ours_sp.bos_token_id, ours_sp.eos_token_id) == (sp.bos_id(),
                                                         sp.eos_id())


@pytest.mark.parametrize("kind", ["llama3", "sentencepiece"])
def test_saved_tokenizer_loads_alone(request, tmp_path, kind):
  # What an export writes: transformers loads it with nothing beside it
  # and encodes as the reference.
  ours = request.getfixturevalue("ours3" if kind == "llama3" else "ours_sp")
  tok_io.save_tokenizer(ours, tmp_path)
  again = transformers.AutoTokenizer.from_pretrained(tmp_path)
  texts = TEXTS + [_document(20_000)]
  if kind == "llama3":
    _equal_meta(again, request.getfixturevalue("meta3"), texts)
  else:
    sp = request.getfixturevalue("sp")
    for text in texts:
      assert again(text, split_special_tokens=True)["input_ids"] == (
          [1] + sp.encode(text)), text[:80]
  assert (again.bos_token, again.eos_token) == (ours.bos_token,
                                                ours.eos_token)


# ---- SentencePiece tokenizer.model files (Llama 1/2, the official merge
# script's output) and tokenizer.json as it is ----

needs_llama_tokenizer = pytest.mark.skipif(
    not os.path.isdir(SHARED_TOKENIZER),
    reason="needs the Llama-2 tokenizer fixture")

# Meta's Llama-2 chat prompt (its system prompt has two spaces after
# "safe."), indented code, and other runs of whitespace.
SYSTEM = ("[INST] <<SYS>>\nYou are a helpful, respectful and honest "
          "assistant. Always answer as helpfully as possible, while being "
          "safe.  Your answers should not include any harmful content.\n"
          "<</SYS>>\n\nHi there [/INST]")
SP_TEXTS = [
    "12345", "Hello world", "a  b", "a   b    c", "End.  Next sentence.",
    "\tindent\t\ttabs", "line1\nline2\n\n  line3", "  leading", "trailing  ",
    " ", "", SYSTEM,
    "def f(x):\n    if x:\n        return 1\n    return 2\n",
    "naïve café 日本語 🤗", "3.14159 and 2024-01-01",
]


@pytest.fixture(scope="module")
def sp():
  if not os.path.isdir(SHARED_TOKENIZER):
    pytest.skip("needs the Llama-2 tokenizer fixture")
  return sentencepiece.SentencePieceProcessor(
      model_file=os.path.join(SHARED_TOKENIZER, "tokenizer.model"))


def _tokenizer_dir(path, with_config=True, **settings):
  """tokenizer.model, and the fixture's tokenizer_config.json with
  `settings` changed."""
  path.mkdir()
  shutil.copy(os.path.join(SHARED_TOKENIZER, "tokenizer.model"), path)
  if with_config:
    with open(os.path.join(SHARED_TOKENIZER, "tokenizer_config.json")) as f:
      (path / "tokenizer_config.json").write_text(
          json.dumps({**json.load(f), **settings}))
  return path


@pytest.mark.parametrize("with_config,settings", [
    (True, {}), (True, {"legacy": False}), (False, {})],
    ids=["fixture", "not_legacy", "model_alone"])
def test_sentencepiece_only_encodes_as_sentencepiece(tmp_path, sp, with_config,
                                                     settings):
  tok = load_tokenizer(_tokenizer_dir(tmp_path / "tok", with_config,
                                      **settings))
  assert tok("12345")["input_ids"] == [1, 29871, 29896, 29906, 29941, 29946,
                                       29945]
  for text in SP_TEXTS:
    assert tok(text)["input_ids"] == [1] + sp.encode(text), text
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == (
        sp.decode(sp.encode(text))), text
  assert tok(SP_TEXTS, add_special_tokens=False)["input_ids"] == [
      sp.encode(t) for t in SP_TEXTS]
  assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)


def test_add_bos_and_eos_settings_are_kept(tmp_path, sp):
  tok = load_tokenizer(_tokenizer_dir(tmp_path / "tok", add_bos_token=False,
                                      add_eos_token=True))
  assert tok("a  b")["input_ids"] == sp.encode("a  b") + [2]


def test_official_merge_output(tiny_hf, tmp_path, sp):
  # What merge_lora_weights_and_save_hf_model.py saves with transformers
  # 4.34: the model, and its slow tokenizer with a [PAD] token added.
  directory, _ = tiny_hf("mha")
  ckpt = shutil.copytree(directory, tmp_path / "merged")
  _tokenizer_dir(
      tmp_path / "tok", pad_token="[PAD]", model_max_length=8192,
      padding_side="right", added_tokens_decoder={"32000": {
          "content": "[PAD]", "lstrip": False, "normalized": False,
          "rstrip": False, "single_word": False, "special": True}})
  for f in (tmp_path / "tok").iterdir():
    shutil.copy(f, ckpt)
  (ckpt / "added_tokens.json").write_text('{"[PAD]": 32000}')
  (ckpt / "special_tokens_map.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "[PAD]",
       "unk_token": "<unk>"}))
  checkpoint = Checkpoint.open(ckpt)
  tok = checkpoint.tokenizer
  assert (tok.pad_token_id, len(tok), checkpoint.eos_id) == (32000, 32001, 2)
  assert tok(SYSTEM)["input_ids"] == [1] + sp.encode(SYSTEM)
  assert tok(["a  b", "c"], padding=True)["input_ids"] == [
      [1, 263, 29871, 289], [1, 274, 32000, 32000]]


@needs_llama_tokenizer
def test_tokenizer_json_is_used_as_it_is(tmp_path):
  # A checkpoint with tokenizer.json: transformers' tokenizer of that file,
  # whatever it encodes.
  directory = tmp_path / "tok"
  transformers.AutoTokenizer.from_pretrained(SHARED_TOKENIZER).save_pretrained(
      directory)
  assert (directory / "tokenizer.json").exists()
  shutil.copy(os.path.join(SHARED_TOKENIZER, "tokenizer.model"), directory)
  ours = load_tokenizer(directory)
  theirs = transformers.AutoTokenizer.from_pretrained(directory)
  assert type(ours) is type(theirs)
  assert ours(SP_TEXTS)["input_ids"] == theirs(SP_TEXTS)["input_ids"]
