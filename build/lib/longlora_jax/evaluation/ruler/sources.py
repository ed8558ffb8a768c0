"""What RULER's task generators draw from, offline: the essay haystack,
the word list, and the QA datasets when their files are given.

RULER downloads Paul Graham's essays for its haystack and takes its words
from the `wonderwords` package; here the haystack is the reference text of
the standard library's `pydoc_data` (or the user's files) and the words
are the haystack's own. The QA readers follow RULER's
`scripts/data/synthetic/qa.py`.
"""

import dataclasses
import json
import re
from pathlib import Path

from longlora_jax.core.errors import LongLoraError


@dataclasses.dataclass(frozen=True)
class Sources:
  """What the generators draw from: the essay haystack's words, a word
  list, and QA (questions, documents) per dataset when given."""
  essay: tuple[str, ...]
  words: tuple[str, ...]
  text: str  # the haystack as one string, to keep needles out of it
  qa: dict = dataclasses.field(default_factory=dict)


def pydoc_text() -> str:
  """The standard library's pydoc reference text (about 465k characters
  of English prose with code examples), in a fixed order."""
  from pydoc_data.topics import topics
  return "\n\n".join(topics[k] for k in sorted(topics))


def read_haystack(path: str | Path | None) -> str:
  """The text of `path` (a file, or a directory's .txt and .md files in
  name order), or the pydoc text when None."""
  if path is None:
    return pydoc_text()
  path = Path(path)
  if path.is_dir():
    files = sorted(p for p in path.rglob("*")
                   if p.suffix in (".txt", ".md") and p.is_file())
  elif path.is_file():
    files = [path]
  else:
    raise LongLoraError(f"--haystack {path}: no such file or directory")
  text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace")
                     for p in files)
  if len(text.split()) < 1000:
    raise LongLoraError(f"--haystack {path}: {len(text.split())} words; a "
                        "haystack needs at least 1000 (it is repeated to "
                        "reach long lengths)")
  return text


def make_sources(text: str, qa: dict | None = None) -> Sources:
  """Sources over the haystack `text`: its words as RULER splits its essay
  (white space collapsed), and its distinct lowercase words (3-12 letters)
  as the word list."""
  essay = tuple(re.sub(r"\s+", " ", text).strip().split(" "))
  words = tuple(sorted(set(re.findall(r"\b[a-z]{3,12}\b", text))))
  return Sources(essay, words, text, qa or {})


def read_squad(path: str | Path) -> tuple[list[dict], list[str]]:
  """(questions, documents) of a SQuAD 2.0 file as RULER reads it: every
  answerable question, its paragraph, and the other paragraphs of its
  article as preferred distractors."""
  data = _read_json(path, "--squad")
  docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
  index = {c: i for i, c in enumerate(docs)}
  questions = []
  for d in data["data"]:
    article = [index[p["context"]] for p in d["paragraphs"]]
    for p in d["paragraphs"]:
      own = index[p["context"]]
      questions += [{"query": q["question"],
                     "answers": [a["text"] for a in q["answers"]],
                     "docs": [own], "more": [i for i in article if i != own]}
                    for q in p["qas"] if not q.get("is_impossible")]
  return questions, docs


def read_hotpotqa(path: str | Path) -> tuple[list[dict], list[str]]:
  """(questions, documents) of a HotpotQA dev (distractor) file as RULER
  reads it: documents are "title\\nsentences"."""
  data = _read_json(path, "--hotpotqa")
  doc = lambda title, sents: f"{title}\n{''.join(sents)}"
  docs = sorted({doc(t, s) for d in data for t, s in d["context"]})
  index = {c: i for i, c in enumerate(docs)}
  return [{"query": d["question"], "answers": [d["answer"]],
           "docs": [index[doc(t, s)] for t, s in d["context"]], "more": []}
          for d in data], docs


def _read_json(path, flag):
  try:
    return json.loads(Path(path).read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise LongLoraError(f"{flag} {path}: cannot read it as JSON ({e})") \
        from None
