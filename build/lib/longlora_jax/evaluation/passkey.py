"""The passkey-retrieval protocol of the official LongLoRA evaluation.

A passkey sentence is hidden at a random point of repeated filler text; the
model must continue "The pass key is" with the number. Texts, lengths and
random draws reproduce the official script (itself from landmark-attention),
so accuracies are comparable with published ones.

The official lengths are characters sized for Llama's SentencePiece
tokenizer (about 3.75 characters a token, in steps of 1024 characters); for
any other tokenizer the filler is measured with it (`passkey_filler`), so
that prompts are as long in tokens as asked.
"""

import json
from pathlib import Path

import numpy as np

from longlora_jax.core.errors import LongLoraError

TASK = ("There is an important info hidden inside a lot of irrelevant text. "
        "Find it and memorize them. I will quiz you about the important "
        "information there.")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again.")
QUESTION = "What is the pass key? The pass key is"
_FILLER_TEXT = " ".join([FILLER] * 5000)


# The tokenizers the official lengths are sized for.
_LLAMA_SENTENCEPIECE = ("LlamaTokenizer", "LlamaTokenizerFast",
                        "CodeLlamaTokenizer", "CodeLlamaTokenizerFast")


def default_protocol(tokenizer) -> str:
  """"official" for Llama's SentencePiece tokenizer, which the official
  schedule of filler lengths is sized for, else "measured"."""
  return ("official" if {type(tokenizer).__name__, _named_class(tokenizer)}
          & set(_LLAMA_SENTENCEPIECE) else "measured")


def _named_class(tokenizer) -> str | None:
  """The class its tokenizer_config.json names: a bare tokenizer.model
  loads through transformers' generic backend (`load_tokenizer`), whatever
  tokenizer it is."""
  directory = getattr(tokenizer, "name_or_path", None)
  try:
    return json.loads(Path(directory, "tokenizer_config.json").read_text(
        )).get("tokenizer_class") if directory else None
  except (OSError, ValueError):
    return None


def filler_lengths(max_tokens: int, interval: int,
                   tokenizer=None) -> list[int]:
  """Filler characters per evaluation step, for prompts `interval`,
  2 `interval`, ... tokens long up to `max_tokens`: the official schedule
  (Llama tokens, approximately) without `tokenizer`, else measured with it."""
  steps = range(1, max_tokens // interval + 1)
  if tokenizer is None:
    return [int(3.75 * i * interval // 1024 * 1024) for i in steps]
  return [passkey_filler(tokenizer, i * interval) for i in steps]


def _prompt_tokens(tokenizer, n_filler: int) -> int:
  return len(tokenizer(passkey_prompt(n_filler, seed=0)[0])["input_ids"])


def passkey_filler(tokenizer, prompt_tokens: int) -> int:
  """Filler characters that make a passkey prompt `prompt_tokens` long with
  `tokenizer`: a linear fit of the prompt's tokens against its filler, then
  one correction on the prompt it gives."""
  fixed = _prompt_tokens(tokenizer, 1) - 1
  if prompt_tokens <= fixed + 1:
    raise LongLoraError(f"a passkey prompt takes more than {fixed + 1} tokens "
                        f"of this tokenizer; {prompt_tokens} is too short")
  per_char = (_prompt_tokens(tokenizer, 1001) - fixed - 1) / 1000
  n = max(1, int((prompt_tokens - fixed) / per_char))
  return max(1, n + int((prompt_tokens - _prompt_tokens(tokenizer, n))
                        / per_char))


def passkey_prompt(n_filler: int, seed: int) -> tuple[str, str]:
  """(prompt, answer) for `n_filler` characters of filler and trial `seed`.

  Draws from NumPy's legacy generator seeded with the trial index, in the
  official order: the insertion point, then the key in [1, 50000).
  """
  if n_filler < 1:
    raise ValueError(f"n_filler={n_filler}: the protocol needs at least one "
                     "filler character (use an interval of 274 tokens or more)")
  if n_filler > len(_FILLER_TEXT):
    raise ValueError(f"n_filler={n_filler} exceeds the {len(_FILLER_TEXT)} "
                     "characters of filler the protocol has")
  rng = np.random.RandomState(seed)
  n_prefix = rng.randint(0, n_filler)
  n_suffix = n_filler - n_prefix
  key = rng.randint(1, 50000)
  info = f"The pass key is {key}. Remember it. {key} is the pass key."
  lines = [TASK, _FILLER_TEXT[:n_prefix], info, _FILLER_TEXT[:n_suffix],
           QUESTION]
  return "\n".join(lines), str(key)


def answer_ids(tokenizer, answer: str) -> list[int]:
  """The answer's token ids as scored: tokenised alone, BOS dropped."""
  ids = list(tokenizer(answer)["input_ids"])
  if tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]:
    ids = ids[1:]
  return ids


def is_correct(generated: list[int], expected: list[int]) -> bool:
  """Exact match of the greedy continuation with the answer's ids."""
  return list(map(int, generated)) == list(map(int, expected))


def retrieval(config, params, tokenizer, n_filler: int, trials: int, *,
              chunk_size: int = 2048, on_trial=None) -> tuple[int, int]:
  """(correct answers, mean prompt tokens) of `trials` greedy retrievals
  with `n_filler` filler characters; `on_trial()` after each."""
  from longlora_jax.model.generation import generate
  correct, tokens = 0, 0
  for trial in range(trials):
    prompt, answer = passkey_prompt(n_filler, seed=trial)
    ids = np.asarray(tokenizer(prompt)["input_ids"], np.int32)[None]
    expected = answer_ids(tokenizer, answer)
    out = generate(config, params, ids, max_new_tokens=len(expected),
                   eos_token_id=None, chunk_size=chunk_size)
    correct += is_correct(out[0], expected)
    tokens += ids.shape[1]
    if on_trial is not None:
      on_trial()
  return correct, tokens // trials
