import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from longlora_jax.model import lora
from longlora_jax.evaluation.ruler import suite as ruler
from longlora_jax.evaluation.ruler import sources as rs
from longlora_jax.evaluation.ruler import tasks as rt
from longlora_jax.attention.dispatch import AttentionSpec
from longlora_jax.model.config import LlamaConfig
from longlora_jax.demo.base import save_byte_tokenizer
from longlora_jax.model.loss import IGNORE_INDEX
from longlora_jax.model.llama import init_params
from longlora_jax.parallel.sharding import make_mesh
from longlora_jax.training.recipe import TrainConfig
from longlora_jax.training.step import init_state, jit_train_step, params_of
from tests.conftest import SHARED_TOKENIZER

# RULER's generation budgets (synthetic/constants.py), written out here.
BUDGET = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}
QUESTION = "\nWhat is the special magic {type} for {key} mentioned in the "\
    "provided text?"
PREFIX = " The special magic {type} for {key} mentioned in the provided "\
    "text is"


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
  directory = tmp_path_factory.mktemp("bytes")
  save_byte_tokenizer(directory)
  return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def src():
  return rs.make_sources(rs.read_haystack(None))


def _unit_tokens(tok, task: rt.Task) -> int:
  """Tokens of one haystack unit: RULER fills a length to within one."""
  unit = {"noise": rt.NOISE, "needle": rt.NEEDLE.format(
      type_v=task.type_v, key="0" * 36, value="0" * 36),
          "essay": "interchangeable"}[task.haystack]
  if task.family in ("cwe", "fwe"):
    unit = "12345. interchangeable"
  return len(tok(unit, add_special_tokens=False)["input_ids"])


def _check_prompts(tok, name, length, src):
  task = rt.TASKS[name]
  items = ruler.prompts(tok, name, length, samples=4, seed=0, sources=src)
  assert items is not None, name
  for p in items:
    total = len(p.ids) + BUDGET[task.family]
    assert total <= length, (name, total)
    assert total > length - _unit_tokens(tok, task) - length // 50, (
        name, total)
    text = tok.decode(p.ids)
    for answer in p.answers:
      # A needle's value once, where it was put; the other tasks' answers
      # are repeated by design (chains, frequent words).
      found = text.count(answer)
      assert found == 1 if task.family == "niah" else found >= 1, (
          name, answer)
  return items


@pytest.mark.parametrize("name", [n for n, t in rt.TASKS.items()
                                  if t.family in ("niah", "fwe")])
def test_prompts_fill_the_length_with_bytes(byte_tok, src, name):
  _check_prompts(byte_tok, name, 2048, src)


@pytest.mark.skipif(not os.path.isdir(SHARED_TOKENIZER),
                    reason="shared Llama-2 tokenizer fixture not present")
@pytest.mark.parametrize("name", [n for n, t in rt.TASKS.items()
                                  if t.family != "qa"])
def test_prompts_fill_the_length_with_llama2_tokens(src, name):
  tok = transformers.AutoTokenizer.from_pretrained(SHARED_TOKENIZER)
  items = _check_prompts(tok, name, 4096, src)
  assert all(p.ids[0] == tok.bos_token_id for p in items)


@pytest.mark.parametrize("name,tolerance", [("niah_single_1", 0.02),
                                            ("niah_single_3", 0.1)])
def test_needle_sits_at_the_requested_depth_in_tokens(byte_tok, src, name,
                                                      tolerance):
  depths = [0, 25, 50, 75, 100]
  items = ruler.prompts(byte_tok, name, 4096, samples=5, seed=1, sources=src,
                        depths=depths)
  for p, depth in zip(items, depths):
    assert p.depth == depth
    text = byte_tok.decode(p.ids)
    key = re.search(r"for (\S+) mentioned in the provided text\?",
                    text).group(1)
    kind = {"numbers": "number", "uuids": "uuid"}[rt.TASKS[name].type_v]
    # The haystack lies between the instruction's line and the question.
    start = len(byte_tok(text[:text.index("\n") + 1])["input_ids"])
    end = len(byte_tok(text[:text.index(QUESTION.format(type=kind, key=key))])[
        "input_ids"])
    at = len(byte_tok(text[:text.index(f"for {key} is: ")])["input_ids"])
    assert abs((at - start) / (end - start) - depth / 100) <= tolerance
    assert text.endswith(PREFIX.format(type=kind, key=key))


def test_chat_template_wraps_the_task_and_the_prefix_follows(byte_tok, src):
  tok = transformers.AutoTokenizer.from_pretrained(byte_tok.name_or_path)
  tok.chat_template = ("{% for m in messages %}[INST] {{ m['content'] }} "
                       "[/INST]{% endfor %}")
  assert ruler.uses_chat(tok, "auto") and not ruler.uses_chat(tok, "none")
  assert not ruler.uses_chat(byte_tok, "auto")
  items = ruler.prompts(tok, "niah_single_1", 1024, samples=1, seed=0,
                        sources=src, chat=True)
  text = tok.decode(items[0].ids)
  assert text.startswith("[INST] A special magic number is hidden")
  assert re.search(r"provided text\? \[/INST\] The special magic number for "
                   r"\S+ mentioned in the provided text is$", text)
  assert items[0].ids[0] != tok.bos_token_id  # the template has none


def test_fit_finds_the_largest_haystack():
  # count(n) = 10 + 3n <= 100: n = 30.
  assert ruler.fit(lambda n: n, lambda n: 10 + 3 * n, 100, lo=1) == 30
  assert ruler.fit(lambda n: n, lambda n: 10 + 3 * n, 12, lo=1) is None


def test_batches_share_one_length_by_trimming_filler():
  p = lambda n, trim: ruler.Prompt(np.arange(n), ("a",), None, trim)
  items = [p(500, (10, 400)), p(503, (10, 400)), p(501, None),
           p(600, (10, 20)), p(501, (10, 400))]
  batches = ruler.equal_batches(items, size=5)
  # 503 loses 3 filler tokens (390..399); 501 without filler, and 600
  # (100 over, more than 1% and its filler), run on their own.
  assert [idx for idx, _ in batches] == [[0, 1, 4], [2], [3]]
  ids = batches[0][1]
  assert ids.shape == (3, 500)
  np.testing.assert_array_equal(ids[1], np.r_[0:397, 400:503])


def test_depth_table_averages_single_needle_tasks():
  sample = lambda depth, score: {"depth": depth, "score": score}
  results = {
      "niah_single_1": {1024: {"samples": [sample(0, 1.0), sample(50, 0.0)]}},
      "niah_single_2": {1024: {"samples": [sample(0, 0.0), sample(50, 0.0)]},
                        2048: {"samples": [sample(50, 1.0)]}},
      "niah_multikey_2": {1024: {"samples": [sample(0, 1.0)]}},
  }
  table = ruler.depth_table(results, [1024, 2048], [0, 50])
  np.testing.assert_array_equal(table, [[50, np.nan], [0, 100]])


@pytest.mark.parametrize("prediction,references,metric,expected", [
    # string_match_all: the share of references found, case-insensitive.
    ("The numbers are 1234567 and 7654321.", ["1234567", "7654321"], "all",
     1.0),
    ("The numbers are 1234567.", ["1234567", "7654321"], "all", 0.5),
    ("  APPLE, pear ", ["apple", "Pear", "plum"], "all", 2 / 3),
    ("nothing", ["1234567"], "all", 0.0),
    # string_match_part: any reference.
    ("It was Denver.", ["Denver Broncos", "Denver"], "part", 1.0),
    ("It was Boston.", ["Denver Broncos", "Denver"], "part", 0.0),
])
def test_scores_match_rulers_definitions(prediction, references, metric,
                                         expected):
  one = ruler.match_all if metric == "all" else ruler.match_part
  assert one(prediction, references) == pytest.approx(expected)


def test_task_score_is_a_rounded_percentage():
  # ((1 + 0.5 + 0) / 3) * 100 = 50.0; RULER rounds to two decimals.
  assert ruler.score(["a b", "a", "x"], [["a", "b"]] * 3, "all") == 50.0
  assert ruler.score(["a", "b", "c"], [["a"], ["a"], ["c"]], "part") == 66.67
  # Control characters become new lines (eval/evaluate.py).
  assert ruler.postprocess(" 12\x0034\t ") == "12\n34"


# ---- the suite finds a known answer ----

def _word_tokenizer():
  """A byte-level BPE tokenizer that merges RULER's template words but no
  digits, so a prompt is short in tokens and a number is one token per
  digit."""
  from tokenizers import (Tokenizer, decoders, models, pre_tokenizers,
                          processors, trainers)
  words = " ".join(f"{a}-{b}" for a in WORDS for b in WORDS)
  corpus = [rt._NIAH, rt._NIAH_PREFIX, rt.NOISE, rt.NEEDLE, QUESTION,
            PREFIX, "number", words] * 20
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", 1)])
  tok.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
      pad_token="<pad>")


WORDS = ("alpha", "bravo", "delta", "gamma", "sigma", "kappa", "omega")


def test_the_suite_finds_a_known_answer():
  # A tiny Llama learns, with the project's train step, to copy the token
  # `lag` positions back. With the needle at depth 100% and keys of one
  # length, `lag` is the distance (in RULER's template, written out above)
  # from the needle's value to the answer, so a model that copies finds
  # the needle; an untrained one is at chance (0%).
  tok = _word_tokenizer()
  src = rs.make_sources(" ".join(WORDS * 200))  # keys: 5-letter words
  tail = (" 1234567." + QUESTION + PREFIX).format(type="number",
                                                  key="alpha-bravo")
  lag = len(tok(tail, add_special_tokens=False)["input_ids"])
  alphabet = np.array([tok.convert_tokens_to_ids(c) for c in "Ġ0123456789"])
  cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64,
                    intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=1024,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
  params = init_params(cfg, jax.random.key(0))

  def score(params):
    scores = []
    for length in (320, 448):
      items = ruler.prompts(tok, "niah_single_1", length, samples=4, seed=7,
                            sources=src, depths=[100])
      result = ruler.run_task(cfg, params, tok, "niah_single_1", items)
      scores.append(result["score"])
    return scores

  assert score(params) == [0.0, 0.0]
  tc = TrainConfig(attention=AttentionSpec("full", implementation="dense"),
                   dtype="float32", lr=1e-2, warmup=10, remat="none",
                   accum=1)
  state = init_state(params, lora.full_mask(params), tc)
  rng = np.random.default_rng(0)

  def batch():  # rows of period `lag`: every later token is a copy
    rows = np.tile(rng.choice(alphabet, size=(32, lag)), (1, 3))
    labels = np.where(np.arange(3 * lag) < lag, IGNORE_INDEX, rows)
    return {"input_ids": jnp.asarray(rows[None], jnp.int32),
            "labels": jnp.asarray(labels[None], jnp.int32)}

  mesh = make_mesh("fsdp=1", jax.devices()[:1])
  step, s_shard, b_shard = jit_train_step(cfg, tc, mesh, state, batch())
  state = jax.device_put(state, s_shard)
  for _ in range(60):
    state, metrics = step(state, jax.device_put(batch(), b_shard))
  assert float(metrics["loss"]) < 0.05
  assert min(score(params_of(state))) >= 75.0
