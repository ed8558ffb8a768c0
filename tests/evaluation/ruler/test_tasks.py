import json
import random
import re

import pytest

from longlora_jax.evaluation.ruler import sources as rs
from longlora_jax.evaluation.ruler import tasks as rt

# RULER's texts (NVIDIA/RULER scripts/data/synthetic/constants.py and
# niah.py), written out here independently, in their one-answer form.
NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_ONE = ("A special magic number is hidden within the following text. "
            "Make sure to memorize it. I will quiz you about the number "
            "afterwards.\n{context}\nWhat is the special magic number for "
            "{key} mentioned in the provided text?")
PREFIX_ONE = (" The special magic number for {key} mentioned in the provided "
              "text is")
NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
         "There and back again.")


@pytest.fixture(scope="module")
def src():
  return rs.make_sources(rs.read_haystack(None))


@pytest.mark.parametrize("depth", [0, 30, 100])
def test_single_needle_in_noise_follows_rulers_template(src, depth):
  d = rt.niah(rt.TASKS["niah_single_1"], 20, random.Random(0), src, [depth])
  key = re.search(r"for (\S+) mentioned", d.prefix).group(1)
  value, = d.answers
  assert re.fullmatch(r"[1-9]\d{6}", value)
  lines = [NOISE] * 20
  lines.insert(20 * depth // 100, NEEDLE.format(key=key, value=value))
  assert d.text == NIAH_ONE.format(context="\n".join(lines), key=key)
  assert d.prefix == PREFIX_ONE.format(key=key)
  assert d.text.count(value) == 1 and value not in d.prefix


def test_multi_query_asks_for_every_value(src):
  d = rt.niah(rt.TASKS["niah_multiquery"], 200, random.Random(1), src,
              [10, 40, 70, 90])
  keys = re.search(r"for (.+) mentioned", d.prefix).group(1)
  assert d.text.startswith("Some special magic numbers are hidden")
  assert d.prefix.startswith(" The special magic numbers for")
  assert d.prefix.endswith(" are")
  assert len(d.answers) == 4 and keys.count(", ") == 3 and ", and " in keys
  for value in d.answers:
    assert d.text.count(f"is: {value}.") == 1


def test_multi_key_3_hides_uuids_among_uuid_needles(src):
  d = rt.niah(rt.TASKS["niah_multikey_3"], 50, random.Random(2), src, [50])
  uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
  needles = re.findall(rf"special magic uuids for ({uuid}) is: ({uuid})\.",
                       d.text)
  assert len(needles) == 51  # 50 distractors and the one asked for
  asked = re.search(r"for (\S+) mentioned", d.prefix).group(1)
  assert [v for k, v in needles if k == asked] == list(d.answers)


def test_essay_needle_sits_between_sentences_at_its_depth(src):
  d = rt.niah(rt.TASKS["niah_single_2"], 3000, random.Random(3), src, [40])
  context = d.text.split("\n", 1)[1].rsplit("\nWhat is", 1)[0]
  before, after = context.split(NEEDLE.format(
      key=re.search(r"for (\S+) mentioned", d.prefix).group(1),
      value=d.answers[0]))
  assert before.endswith((". ", "? ", "! "))
  # The sentence boundary nearest to 40% of the characters: no sentence
  # ends closer to it than this one.
  share = len(before) / (len(before) + len(after))
  ends = [m.end() for m in re.finditer(r"[.!?] ", before + " " + after)]
  total = len(before) + len(after)
  assert all(abs(e / total - 0.4) >= abs(share - 0.4) - 1e-3 for e in ends)


def test_needles_never_come_from_the_haystack():
  text = "plain word " * 500 + "word-word 1234567 "
  src = rs.make_sources(text)
  assert src.words == ("plain", "word")
  rng = random.Random(0)
  for _ in range(50):
    d = rt.niah(rt.TASKS["niah_single_2"], 100, rng, src, [50])
    key = re.search(r"for (\S+) mentioned", d.prefix).group(1)
    assert key != "word-word" and d.answers[0] not in text


def test_variable_tracking_chain(src):
  d = rt.vt(rt.TASKS["vt"], 30, random.Random(4), src)
  names = d.answers
  assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
  value = re.search(rf"VAR {names[0]} = (\d{{5}})", d.text).group(1)
  for a, b in zip(names, names[1:]):
    assert f"VAR {b} = VAR {a} " in d.text
  assert d.prefix == (" Answer: According to the chain(s) of variable "
                      "assignment in the text above, 5 variables are "
                      f"assigned the value {value}, they are: ")
  assert d.text.count(NOISE) == 30


def test_common_words_counts(src):
  d = rt.cwe(rt.TASKS["cwe"], 60, random.Random(5), src)
  shot, main = d.text.split("\nBelow is a numbered list", 1)
  words = re.findall(r"\d+\. (\w+)", main.split("\nQuestion")[0])
  counts = {w: words.count(w) for w in set(words)}
  assert sorted(w for w, c in counts.items() if c == 30) == sorted(d.answers)
  assert sum(c == 3 for c in counts.values()) == 50
  assert shot.count("Answer: The top 10 words") == 1


def test_frequent_words_follow_zipf(src):
  d = rt.fwe(rt.TASKS["fwe"], 2000, random.Random(6), src, length=4096)
  words = d.text.split("coded words. ")[1].split("\nQuestion")[0].split(" ")
  top = sorted({w: words.count(w) for w in set(words)}.items(),
               key=lambda kv: -kv[1])
  # int(2000 k^-2 / (pi^2 / 6)) for ranks 1-4: 1215, 303, 135, 75.
  assert [c for _, c in top[:4]] == [1215, 303, 135, 75]
  assert top[0][0] == "..." and tuple(w for w, _ in top[1:4]) == d.answers


def test_qa_reads_squad_and_puts_the_paragraph_in(tmp_path, src):
  squad = {"data": [{"paragraphs": [
      {"context": f"Paragraph {i} of article {a}.", "qas": [
          {"question": f"Q{a}{i}?", "is_impossible": False,
           "answers": [{"text": f"A{a}{i}"}]},
          {"question": "none?", "is_impossible": True, "answers": []}]}
      for i in range(3)]} for a in range(4)]}
  (tmp_path / "squad.json").write_text(json.dumps(squad))
  src = rs.make_sources(src.text, {"squad": rs.read_squad(
      tmp_path / "squad.json")})
  d = rt.qa(rt.TASKS["qa_1"], 5, random.Random(0), src, index=4)
  assert d.answers == ("A11",)
  assert d.text.endswith("Question: Q11?") and d.prefix == " Answer:"
  docs = re.findall(r"Document \d+:\n(Paragraph \d of article \d)\.", d.text)
  # Its own paragraph, then its article's two others, then two more.
  assert len(docs) == 5 and "Paragraph 1 of article 1" in docs
  assert sum(doc.endswith("article 1") for doc in docs) == 3
