"""RULER's synthetic tasks, generated offline: templates, needles,
haystacks and references.

Re-implemented from the definitions of NVIDIA/RULER (Hsieh et al. 2024,
"RULER: What's the Real Context Size of Your Long-Context Language
Models?"): the task list and arguments of `scripts/synthetic.yaml`, the
templates, answer prefixes and generation budgets of
`scripts/data/synthetic/constants.py`, the generators of
`scripts/data/synthetic/{niah,variable_tracking,common_words_extraction,
freq_words_extraction,qa}.py` (the metrics: `ruler`).

Where RULER downloads something, this uses what every Python has (the
haystack and word lists: `ruler_sources`); and
- the common-words list tops the haystack's words up with random 6-letter
  words when it needs more (a larger English word list there);
- sentences are split at `.`, `!` or `?` followed by white space (NLTK's
  punkt there).
Two deliberate changes: every single-needle task puts its needle at a
requested depth, so a depth x length heatmap can be drawn (RULER draws the
depth at random, from 40 depths for the essay haystack and uniformly for
the others); and a depth is a share of the haystack's characters, not of
its sentences (see `_insert`).

A draft is a task's prompt text before the model's chat template, the
answer prefix RULER appends after it, and the references to score against.
"""

import dataclasses
import random
import re
import string
import uuid

import numpy as np

from longlora_jax.evaluation.ruler.sources import Sources

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
         "There and back again.")
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
# RULER's templates and answer prefixes (synthetic/constants.py).
_NIAH = ("Some special magic {type_v} are hidden within the following text. "
         "Make sure to memorize it. I will quiz you about the {type_v} "
         "afterwards.\n{context}\nWhat are all the special magic {type_v} for "
         "{query} mentioned in the provided text?")
_NIAH_PREFIX = (" The special magic {type_v} for {query} mentioned in the "
                "provided text are")
_VT = ("Memorize and track the chain(s) of variable assignment hidden in the "
       "following text.\n\n{context}\nQuestion: Find all variables that are "
       "assigned the value {query} in the text above.")
_VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in "
              "the text above, {num_v} variables are assigned the value "
              "{query}, they are: ")
_CWE = ("Below is a numbered list of words. In these words, some appear more "
        "often than others. Memorize the ones that appear most often.\n"
        "{context}\nQuestion: What are the 10 most common words in the above "
        "list?")
_CWE_PREFIX = (" Answer: The top 10 words that appear most often in the list "
               "are:")
_FWE = ("Read the following coded text and track the frequency of each coded "
        "word. Find the three most frequently appeared coded words. {context}"
        "\nQuestion: Do not provide any explanation. Please ignore the dots "
        "'....'. What are the three most frequently appeared words in the "
        "above coded text?")
_FWE_PREFIX = (" Answer: According to the coded text above, the three most "
               "frequently appeared words are:")
_QA = ("Answer the question based on the given documents. Only give me the "
       "answer and do not output any other words.\n\nThe following are given "
       "documents.\n\n{context}\n\nAnswer the question based on the given "
       "documents. Only give me the answer and do not output any other words."
       "\n\nQuestion: {query}")
_QA_PREFIX = " Answer:"
# RULER's tokens_to_generate per task family.
GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
DEFAULT_DEPTHS = tuple(range(0, 101, 10))


@dataclasses.dataclass(frozen=True)
class Task:
  """One of RULER's tasks (synthetic.yaml): its family and arguments."""
  family: str  # niah, vt, cwe, fwe, qa
  haystack: str = "essay"  # niah: noise, essay or needle
  type_k: str = "words"
  type_v: str = "numbers"
  keys: int = 1
  values: int = 1
  queries: int = 1
  dataset: str = ""  # qa: squad or hotpotqa

  @property
  def needles(self) -> int:
    return max(self.keys, self.queries) * self.values

  @property
  def metric(self) -> str:
    return "part" if self.family == "qa" else "all"


TASKS = {
    "niah_single_1": Task("niah", haystack="noise"),
    "niah_single_2": Task("niah"),
    "niah_single_3": Task("niah", type_v="uuids"),
    "niah_multikey_1": Task("niah", keys=4),
    "niah_multikey_2": Task("niah", haystack="needle"),
    "niah_multikey_3": Task("niah", haystack="needle", type_k="uuids",
                            type_v="uuids"),
    "niah_multivalue": Task("niah", values=4),
    "niah_multiquery": Task("niah", keys=4, queries=4),
    "vt": Task("vt", haystack="noise"),
    "cwe": Task("cwe"),
    "fwe": Task("fwe"),
    "qa_1": Task("qa", dataset="squad"),
    "qa_2": Task("qa", dataset="hotpotqa"),
}


@dataclasses.dataclass(frozen=True)
class Draft:
  """A task's text (template filled, no chat template), the answer prefix
  RULER appends after the chat template, the references, and a stretch of
  the text with no needle in it that may be trimmed (or None)."""
  text: str
  prefix: str
  answers: tuple[str, ...]
  filler: str | None = None


# ---- random draws (niah.py, variable_tracking.py) ----

def _number(rng: random.Random) -> str:
  return str(rng.randint(10**6, 10**7 - 1))  # 7 digits


def _uuid(rng: random.Random) -> str:
  return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _draw(kind: str, rng: random.Random, src: Sources) -> str:
  if kind == "numbers":
    return _number(rng)
  if kind == "uuids":
    return _uuid(rng)
  # RULER's keys are adjective-noun pairs ("fantastic-apple").
  return f"{rng.choice(src.words)}-{rng.choice(src.words)}"


def _fresh(kind, rng, src, taken: set, in_text: bool = True) -> str:
  """A draw not already used, nor (`in_text`) anywhere in the haystack
  text, so that an answer appears only where it was put."""
  while True:
    x = _draw(kind, rng, src)
    if x not in taken and not (in_text and x in src.text):
      taken.add(x)
      return x


def _sentences(text: str) -> list[str]:
  return re.split(r"(?<=[.!?])\s+", text.strip())


def _insert(units: list[str], items: list[str], depths, sep: str):
  """`units` joined by `sep` with `items` inserted at the boundaries
  between units nearest to `depths` percent of the characters, and the
  longest stretch of units without an item.

  RULER inserts before unit int(len(units) * depth / 100), which is the
  same for units of equal size; a reference manual's "sentences" (code
  blocks have no full stops) are too uneven for that to be the depth.
  """
  bounds = np.cumsum([0] + [len(u) + len(sep) for u in units])
  cuts = sorted(int(np.abs(bounds - bounds[-1] * d / 100).argmin())
                for d in depths)
  parts, stretches, last = [], [], 0
  for cut, item in zip(cuts, items):
    stretches.append(units[last:cut])
    parts += [sep.join(units[last:cut]), item]
    last = cut
  stretches.append(units[last:])
  parts.append(sep.join(units[last:]))
  longest = sep.join(max(stretches, key=len))
  return sep.join(p for p in parts if p), longest or None


def niah(task: Task, n: int, rng: random.Random, src: Sources,
         depths) -> Draft:
  """Needle(s) "One of the special magic {numbers} for {key} is: {value}."
  in `n` units of haystack (essay words, noise sentences or distractor
  needles) at `depths` (percent, one per needle)."""
  taken, keys, needles, values = set(), [], [], []
  for _ in range(max(task.keys, task.queries)):
    keys.append(_fresh(task.type_k, rng, src, taken))
    values.append([_fresh(task.type_v, rng, src, taken)
                   for _ in range(task.values)])
    needles += [NEEDLE.format(type_v=task.type_v, key=keys[-1], value=v)
                for v in values[-1]]
  rng.shuffle(needles)
  if task.haystack == "essay":
    words = (src.essay * -(-n // len(src.essay)))[:n]
    context, filler = _insert(_sentences(" ".join(words)), needles, depths,
                              " ")
  else:
    if task.haystack == "noise":
      units = [NOISE] * n
    else:  # distractor needles with keys and values never asked for
      units = [NEEDLE.format(type_v=task.type_v,
                             key=_fresh(task.type_k, rng, src, taken, False),
                             value=_fresh(task.type_v, rng, src, taken, False))
               for _ in range(n)]
    context, filler = _insert(units, needles, depths, "\n")
  asked = rng.sample(range(len(keys)), task.queries)
  query = (", ".join(keys[i] for i in asked[:-1]) + ", and " +
           keys[asked[-1]] if len(asked) > 1 else keys[asked[0]])
  template, prefix, type_v = _NIAH, _NIAH_PREFIX, task.type_v
  if task.queries * task.values == 1:
    template, prefix = _singular(template), _singular(prefix)
    type_v = type_v[:-1]
  return Draft(template.format(type_v=type_v, context=context, query=query),
               prefix.format(type_v=type_v, query=query),
               tuple(v for i in asked for v in values[i]), filler)


def _singular(text: str) -> str:
  """RULER's rewording of the NIAH template for one answer."""
  for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"),
               ("answers", "answer")):
    text = text.replace(a, b)
  return text


def vt(task: Task, n: int, rng: random.Random, src: Sources,
       chains: int = 1, hops: int = 4, example: str = "") -> Draft:
  """Variable tracking: `chains` chains "VAR A = 12345", "VAR B = VAR A "
  ... of `hops` hops among `n` noise sentences; the answer is every
  variable of the first chain. `example` (a solved instance) goes first."""
  names = set()
  while len(names) < chains * (hops + 1):
    names.add("".join(rng.choices(string.ascii_uppercase, k=5)))
  names = sorted(names)
  rng.shuffle(names)
  lines, variables, value = [NOISE] * n, [], None
  for c in range(chains):
    v = names[c * (hops + 1):(c + 1) * (hops + 1)]
    start = rng.randint(10000, 99998)
    value = start if value is None else value
    chain = [f"VAR {v[0]} = {start}"] + [
        f"VAR {v[j + 1]} = VAR {v[j]} " for j in range(hops)]
    spots = sorted(rng.sample(range(len(lines)), len(chain)))
    for j, (spot, link) in enumerate(zip(spots, chain)):
      lines.insert(spot + j, link)
    variables.append(v)
  context = "\n".join(lines).replace(". \n", ".\n")
  longest, run = 0, 0
  for x in lines:
    run = run + 1 if x == NOISE else 0
    longest = max(longest, run)
  filler = "\n".join([NOISE] * longest) or None
  return Draft(example + _VT.format(context=context, query=value),
               _VT_PREFIX.format(num_v=hops + 1, query=value),
               tuple(variables[0]), filler)


def solved(draft: Draft) -> str:
  """A draft with its answer, as RULER shows one-shot examples."""
  return f"{draft.text}{draft.prefix} {' '.join(draft.answers)}\n"


def cwe(task: Task, n: int, rng: random.Random, src: Sources,
        long: bool = True) -> Draft:
  """Common words: a numbered list of `n` distinct words, 10 of them
  repeated 30 times and the rest 3 (6 and 1 below 4k tokens, `long`
  False), after one solved example of 40 words (20 below 4k)."""
  common = 10
  shape = (30, 3, (40, 10, 3)) if long else (6, 1, (20, 3, 1))

  def listing(count, repeat_common, repeat_rest):
    words = _word_sample(rng, src, count)
    listed = words[:common] * repeat_common + words[common:] * repeat_rest
    rng.shuffle(listed)
    return _numbered(listed), words[:common]

  context, answers = listing(n, shape[0], shape[1])
  shot, shot_answers = listing(*shape[2])
  example = (_CWE.format(context=shot) + _CWE_PREFIX + " " +
             _numbered(shot_answers))
  return Draft(example + "\n" + _CWE.format(context=context), _CWE_PREFIX,
               tuple(answers))


def _numbered(words) -> str:
  return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _word_sample(rng: random.Random, src: Sources, count: int) -> list[str]:
  pool = list(src.words)
  if count > len(pool):  # RULER falls back to a larger English word list.
    pool += sorted(_coded_words(rng, count - len(pool), set(pool)))
  return rng.sample(pool, count)


def _coded_words(rng: random.Random, count: int, taken=()) -> set[str]:
  words = set()
  while len(words) < count:
    w = "".join(rng.choices(string.ascii_lowercase, k=6))
    if w not in taken:
      words.add(w)
  return words


def fwe(task: Task, n: int, rng: random.Random, src: Sources, length: int,
        alpha: float = 2.0) -> Draft:
  """Frequent words: about `n` coded 6-letter words drawn by Zipf's law
  (rank k appears int(n k^-alpha / zeta(alpha)) times) from a vocabulary
  of (length - 50) // 50 words; the top one is '...' (noise) and the
  answers are ranks 2 to 4."""
  from scipy.special import zeta
  vocab = sorted(_coded_words(rng, max((length - GENERATE["fwe"]) // 50, 5)))
  rng.shuffle(vocab)
  vocab[0] = "..."
  counts = (n * np.arange(1, len(vocab) + 1, dtype=float) ** -alpha
            / zeta(alpha)).astype(int)
  text = [w for w, c in zip(vocab, counts) for _ in range(c)]
  rng.shuffle(text)
  return Draft(_FWE.format(context=" ".join(text)), _FWE_PREFIX,
               tuple(vocab[1:4]))


def qa(task: Task, n: int, rng: random.Random, src: Sources,
       index: int) -> Draft:
  """Question `index` of the dataset with its own documents and
  distractors up to `n` documents, shuffled, as "Document i:\\n..."."""
  questions, docs = src.qa[task.dataset]
  q = questions[index % len(questions)]
  if n >= len(docs):
    chosen = (list(range(len(docs))) * -(-n // len(docs)))[:n]
  elif n - len(q["docs"]) > len(q["more"]):
    others = sorted(set(range(len(docs))) - set(q["docs"]) - set(q["more"]))
    chosen = q["docs"] + q["more"] + rng.sample(
        others, max(0, n - len(q["docs"]) - len(q["more"])))
  else:
    chosen = q["docs"] + rng.sample(q["more"], max(0, n - len(q["docs"])))
  rng.shuffle(chosen)
  context = "\n\n".join(f"Document {i + 1}:\n{docs[d]}"
                        for i, d in enumerate(chosen))
  return Draft(_QA.format(context=context, query=q["query"]), _QA_PREFIX,
               tuple(q["answers"]))
