import os

import pytest

from longlora_jax.core.errors import LongLoraError
from longlora_jax.checkpoints.tokenizer import load_tokenizer
from longlora_jax.evaluation.passkey import (answer_ids, default_protocol, filler_lengths,
                                  is_correct, passkey_prompt)
from tests.conftest import SHARED_TOKENIZER

# The official script's texts, written out here independently.
TASK = ("There is an important info hidden inside a lot of irrelevant text. "
        "Find it and memorize them. I will quiz you about the important "
        "information there.")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again.")


def test_filler_lengths_follow_the_official_formula():
  # int(3.75 * (i + 1) * 1000 // 1024 * 1024), worked by hand.
  lengths = filler_lengths(32000, 1000)
  assert len(lengths) == 32
  assert lengths[:5] == [3072, 7168, 10240, 14336, 18432]
  assert lengths[-1] == 119808
  assert filler_lengths(4096, 2048) == [7168, 15360]


# (trial seed, filler chars) -> (chars before the key, key): the first two
# draws of numpy's legacy generator after numpy.random.seed(seed), as the
# official script draws them.
@pytest.mark.parametrize("seed,n,prefix,key", [
    (0, 3072, 2732, 43568), (1, 3072, 1061, 33004), (7, 30720, 28847, 49690),
    (3, 117760, 71530, 1689)])
def test_prompt_matches_official_generator(seed, n, prefix, key):
  prompt, answer = passkey_prompt(n, seed)
  assert answer == str(key)
  lines = prompt.split("\n")
  assert len(lines) == 5
  assert lines[0] == TASK
  assert lines[2] == f"The pass key is {key}. Remember it. {key} is the pass key."
  assert lines[4] == "What is the pass key? The pass key is"
  assert len(lines[1]) == prefix and len(lines[3]) == n - prefix
  assert lines[1] == (" ".join([FILLER] * 2000))[:prefix]
  assert lines[3] == (" ".join([FILLER] * 2000))[:n - prefix]


def test_zero_filler_is_an_error():
  with pytest.raises(ValueError, match="at least one filler character"):
    passkey_prompt(0, 0)


@pytest.mark.skipif(not os.path.isdir(SHARED_TOKENIZER),
                    reason="shared Llama-2 tokenizer fixture not present")
def test_scoring_with_the_real_llama2_tokenizer():
  tok = load_tokenizer(SHARED_TOKENIZER)
  expected = answer_ids(tok, "12345")
  assert expected == [29871, 29896, 29906, 29941, 29946, 29945]
  assert is_correct([29871, 29896, 29906, 29941, 29946, 29945], expected)
  assert not is_correct([29871, 29896, 29906, 29941, 29946, 29946], expected)
  assert not is_correct([29896, 29906, 29941, 29946, 29945], expected)


def _lengths(tokenizer, fillers, trials=5):
  """Prompt tokens of each trial's prompt, per filler length."""
  return [[len(tokenizer(passkey_prompt(n, seed)[0])["input_ids"])
           for seed in range(trials)] for n in fillers]


def test_measured_lengths_land_where_asked_with_a_byte_tokenizer():
  from longlora_jax.checkpoints.checkpoint import Checkpoint
  tok = Checkpoint.open("demo").tokenizer  # One token per byte.
  assert default_protocol(tok) == "measured"
  fillers = filler_lengths(1024, 256, tok)
  for want, got in zip((256, 512, 768, 1024), _lengths(tok, fillers)):
    # Within the digits a trial's key adds or saves (it appears twice).
    assert all(abs(g - want) <= 2 for g in got), (want, got)
  # The official lengths (sized for Llama) overshoot it by far: the
  # issue's --max-tokens 1000 --interval 274 tested 1272 to 3320 tokens.
  assert [min(t) > 1000 for t in _lengths(tok, filler_lengths(1000, 274))
          ] == [True] * 3
  with pytest.raises(LongLoraError, match="a passkey prompt takes more than "
                     "248 tokens of this tokenizer; 200 is too short"):
    filler_lengths(1024, 200, tok)


@pytest.mark.skipif(not os.path.isdir(SHARED_TOKENIZER),
                    reason="shared Llama-2 tokenizer fixture not present")
def test_llama2_keeps_the_official_lengths_and_measured_ones_fit_too():
  tok = load_tokenizer(SHARED_TOKENIZER)
  assert default_protocol(tok) == "official"
  # Measured with SentencePiece (not one token per character): within a
  # few tokens of each length, whatever the trial's key and split.
  fillers = filler_lengths(4000, 1000, tok)
  for want, got in zip((1000, 2000, 3000, 4000), _lengths(tok, fillers)):
    assert all(abs(g - want) <= 4 for g in got), (want, got)


def test_a_bare_llama_tokenizer_model_keeps_the_official_lengths(tmp_path):
  # The official merge script saves tokenizer.model alone; load_tokenizer
  # reads it through transformers' generic backend, whatever the model, so
  # the class its tokenizer_config.json names decides.
  import io
  import json
  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([FILLER, TASK] * 20), model_writer=model,
      vocab_size=300, model_type="bpe", byte_fallback=True, minloglevel=2)
  for name, protocol in (("LlamaTokenizer", "official"), (None, "measured")):
    directory = tmp_path / str(name)
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    if name:
      (directory / "tokenizer_config.json").write_text(json.dumps(
          {"tokenizer_class": name}))
    tok = load_tokenizer(directory)
    assert type(tok).__name__ not in ("LlamaTokenizer", "LlamaTokenizerFast")
    assert default_protocol(tok) == protocol, name
