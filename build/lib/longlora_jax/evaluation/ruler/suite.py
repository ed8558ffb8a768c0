"""A RULER-style long-context evaluation, offline: prompts of a requested
length in the model's own tokens, greedy generation over the KV cache, and
RULER's scores per task and length (the tasks: `ruler_tasks`).

Lengths are RULER's: a prompt and its generation budget together fit in
the length (`len(prompt) + tokens_to_generate <= length`), and the
haystack is as large as fits. Prompts of one task and length are batched:
those a little longer than the shortest of their batch lose that many
haystack tokens from their longest needle-free stretch, so a batch shares
one length and nothing is padded.
"""

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Callable

import numpy as np

from longlora_jax.evaluation.ruler import tasks as rt
from longlora_jax.evaluation.ruler.sources import Sources
from longlora_jax.core.errors import LongLoraError
from longlora_jax.core.files import write_json

CHAT_TEMPLATES = ("auto", "none")
# Fewest haystack units a task needs (a variable chain has 5 links to
# place, the Zipf text needs counts for its top 4 ranks).
_MIN_UNITS = {"niah": 1, "vt": 5, "cwe": 11, "fwe": 30, "qa": 1}
_EXAMPLE_TOKENS = 500  # RULER's one-shot variable-tracking example.


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One sample: its token ids, references, needle depth (percent, single
  needles only) and the token range that may be trimmed (or None)."""
  ids: np.ndarray
  answers: tuple[str, ...]
  depth: float | None
  trim: tuple[int, int] | None


def encode(tokenizer, draft: rt.Draft, chat: bool, *, offsets: bool = False):
  """The tokenizer's encoding of `draft`: in the chat template as the user
  turn when `chat`, then RULER's answer prefix; plain text with the
  tokenizer's special tokens (BOS) otherwise."""
  if chat:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": draft.text}], tokenize=False,
        add_generation_prompt=True) + draft.prefix
  else:
    text = draft.text + draft.prefix
  enc = tokenizer(text, add_special_tokens=not chat,
                  return_offsets_mapping=offsets, verbose=False)
  return text, enc


def uses_chat(tokenizer, chat_template: str) -> bool:
  """`auto`: the chat template when the tokenizer has one."""
  if chat_template not in CHAT_TEMPLATES:
    raise LongLoraError(f"--chat-template {chat_template!r}: choose one of "
                        f"{', '.join(CHAT_TEMPLATES)}")
  return chat_template == "auto" and bool(getattr(tokenizer, "chat_template",
                                                  None))


def fit(make: Callable[[int], rt.Draft], count: Callable[[rt.Draft], int],
        budget: int, lo: int) -> int | None:
  """The largest number of haystack units n >= lo with count(make(n)) <=
  budget (RULER's binary search), or None when even `lo` is too long."""
  if count(make(lo)) > budget:
    return None
  hi = lo
  while count(make(hi * 2)) <= budget:
    hi *= 2
  top = hi * 2  # too long
  while top - hi > 1:
    mid = (hi + top) // 2
    hi, top = (mid, top) if count(make(mid)) <= budget else (hi, mid)
  return hi


def maker(name: str, length: int, index: int, *, seed: int,
          sources: Sources, depths, example_units: int = 0):
  """(n -> Draft, single-needle depth or None) of sample `index` of task
  `name` at `length`: the same random draws for every n."""
  task = rt.TASKS[name]
  key = f"{seed}:{name}:{length}:{index}"
  depth = (depths[index % len(depths)]
           if task.family == "niah" and task.needles == 1 else None)

  def make(n: int) -> rt.Draft:
    rng = random.Random(key)
    if task.family == "niah":
      pool = list(depths)
      at = ([depth] if depth is not None else
            rng.sample(pool, task.needles) if len(pool) >= task.needles
            else rng.choices(pool, k=task.needles))
      return rt.niah(task, n, rng, sources, at)
    if task.family == "vt":
      example = (rt.solved(rt.vt(task, example_units, random.Random(
          key + ":example"), sources)) if example_units else "")
      return rt.vt(task, n, rng, sources, example=example)
    if task.family == "cwe":
      return rt.cwe(task, n, rng, sources, long=length >= 4096)
    if task.family == "fwe":
      return rt.fwe(task, n, rng, sources, length)
    return rt.qa(task, n, rng, sources, index)
  return make, depth


def missing_source(name: str, sources: Sources) -> str | None:
  """Why task `name` cannot run with `sources` (QA without its data)."""
  task = rt.TASKS[name]
  if task.family == "qa" and task.dataset not in sources.qa:
    flag = "--squad dev-v2.0.json" if task.dataset == "squad" else \
        "--hotpotqa hotpot_dev_distractor_v1.json"
    return f"{name} needs {task.dataset} (skipped; pass {flag})"
  return None


def prompts(tokenizer, name: str, length: int, *, samples: int, seed: int,
            sources: Sources, depths=rt.DEFAULT_DEPTHS,
            chat: bool = False) -> list[Prompt] | None:
  """`samples` prompts of task `name` at `length` tokens, or None when the
  task's template and generation budget alone do not fit."""
  task = rt.TASKS[name]
  budget = length - rt.GENERATE[task.family]
  count = lambda d: len(encode(tokenizer, d, chat)[1]["input_ids"])
  lo = _MIN_UNITS[task.family]
  if task.family == "qa":
    lo = max(len(q["docs"]) for q in sources.qa[task.dataset][0][:samples])
  example = 0
  if task.family == "vt":
    plain = lambda n: len(tokenizer(rt.solved(rt.vt(
        task, n, random.Random(seed), sources)), add_special_tokens=False,
        verbose=False)["input_ids"])
    example = fit(lambda n: n, plain, min(_EXAMPLE_TOKENS, length // 4), lo)
    if example is None:
      return None
  first, _ = maker(name, length, 0, seed=seed, sources=sources,
                   depths=depths, example_units=example)
  n = fit(first, count, budget, lo)
  if n is None:
    return None
  out = []
  for i in range(samples):
    make, depth = maker(name, length, i, seed=seed, sources=sources,
                        depths=depths, example_units=example)
    out.append(_prompt(tokenizer, _adjust(make, count, budget, n, lo), chat,
                       depth))
  return out


def _adjust(make, count, budget: int, n: int, lo: int) -> rt.Draft:
  """This sample's draft from `n` units (the first sample's fit): as
  RULER, fewer units (1% at a time) until its own draws fit too; then, as
  RULER does not, more while they still fit, so that every sample comes as
  close to the length."""
  step = max(1, n // 100)
  draft = make(n)
  while count(draft) > budget and n > lo:
    n = max(lo, n - step)
    draft = make(n)
  while count(bigger := make(n + step)) <= budget:
    n, draft = n + step, bigger
  return draft


def _prompt(tokenizer, draft: rt.Draft, chat: bool, depth) -> Prompt:
  fast = getattr(tokenizer, "is_fast", False)
  text, enc = encode(tokenizer, draft, chat, offsets=fast)
  trim = None
  if fast and draft.filler:
    start = text.rfind(draft.filler)
    end = start + len(draft.filler)
    inside = [i for i, (s, e) in enumerate(enc["offset_mapping"])
              if start <= s and e <= end and e > s]
    trim = (inside[0], inside[-1] + 1) if inside else None
  return Prompt(np.asarray(enc["input_ids"], np.int32), draft.answers, depth,
                trim)


def equal_batches(items: list[Prompt], size: int):
  """[(indices, ids `[batch, tokens]`)]: batches of up to `size` prompts
  that share one length, the longer ones trimmed in their filler (at most
  1% of their tokens); a prompt that cannot be trimmed runs with those of
  its own length."""
  out, rest = [], []
  for start in range(0, len(items), size):
    group = list(range(start, min(start + size, len(items))))
    target = min(len(items[i].ids) for i in group)
    rows, kept = [], []
    for i in group:
      p, extra = items[i], len(items[i].ids) - target
      if extra and (p.trim is None or extra > p.trim[1] - p.trim[0]
                    or extra > len(p.ids) // 100):
        rest.append(i)
        continue
      end = p.trim[1] if extra else 0
      rows.append(np.concatenate([p.ids[:end - extra], p.ids[end:]])
                  if extra else p.ids)
      kept.append(i)
    if kept:
      out.append((kept, np.stack(rows)))
  by_length = {}
  for i in rest:
    by_length.setdefault(len(items[i].ids), []).append(i)
  for same in by_length.values():
    for start in range(0, len(same), size):
      idx = same[start:start + size]
      out.append((idx, np.stack([items[i].ids for i in idx])))
  return out


def run_task(config, params, tokenizer, name: str, items: list[Prompt], *,
             batch_size: int = 8, chunk_size: int = 2048,
             on_sample=None) -> dict:
  """Greedy answers to `items` and RULER's score: {"score", "samples":
  [{"tokens", "depth", "answers", "prediction", "score"}]}."""
  from longlora_jax.model.generation import generate
  task = rt.TASKS[name]
  eos = {int(e) for e in np.atleast_1d(config.eos_token_id)} | (
      {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else
      set())
  rows = [None] * len(items)
  for idx, ids in equal_batches(items, batch_size):
    out = generate(config, params, ids,
                   max_new_tokens=rt.GENERATE[task.family],
                   eos_token_id=tuple(sorted(eos)), chunk_size=chunk_size)
    for i, new in zip(idx, out):
      stop = next((t for t, x in enumerate(new) if int(x) in eos), len(new))
      text = tokenizer.decode(new[:stop], skip_special_tokens=True)
      one = match_all if task.metric == "all" else match_part
      rows[i] = {"tokens": int(ids.shape[1]), "depth": items[i].depth,
                 "answers": list(items[i].answers), "prediction": text,
                 "score": one(postprocess(text), items[i].answers)}
      if on_sample is not None:
        on_sample()
  predictions = [r["prediction"] for r in rows]
  return {"task": name, "metric": f"string_match_{task.metric}",
          "score": score(predictions, [r["answers"] for r in rows],
                            task.metric),
          "samples": rows}


def suite(config, params, tokenizer, *, tasks, lengths, samples: int,
          seed: int, sources: Sources, out: Path, settings: dict,
          depths=rt.DEFAULT_DEPTHS, chat: bool = False, batch_size: int = 8,
          chunk_size: int = 2048, progress=None, note=print) -> dict:
  """Every task at every length; each (task, length) is written to
  out/samples/TASK-LENGTH.json as it finishes and reused when run again
  with the same `settings`. Returns {"scores": {task: {length: score or
  None}}, "results": {task: {length: result}}, "notes": [...]}."""
  scores, results, notes = {}, {}, []
  for name in tasks:
    scores[name], results[name] = {}, {}
    if (why := missing_source(name, sources)):
      notes.append(why)
      note(why)
      if progress is not None:
        progress(samples * len(lengths))
      continue
    for length in lengths:
      path = out / "samples" / f"{name}-{length}.json"
      result = _saved(path, settings)
      if result is None:
        items = prompts(tokenizer, name, length, samples=samples, seed=seed,
                        sources=sources, depths=depths, chat=chat)
        if items is None:
          why = (f"{name} does not fit in {length} tokens (its template, "
                 "any one-shot example and "
                 f"{rt.GENERATE[rt.TASKS[name].family]} generated tokens)")
          notes.append(why)
          note(why)
          scores[name][length] = None
          if progress is not None:
            progress(samples)
          continue
        result = run_task(config, params, tokenizer, name, items,
                          batch_size=batch_size, chunk_size=chunk_size,
                          on_sample=progress and (lambda: progress(1)))
        write_json(path, {**result, "length": length, "settings": settings})
      elif progress is not None:
        progress(samples)
      scores[name][length] = result["score"]
      results[name][length] = result
  return {"scores": scores, "results": results, "notes": notes}


def _saved(path: Path, settings: dict) -> dict | None:
  if not path.exists():
    return None
  saved = json.loads(path.read_text())
  return saved if saved.get("settings") == settings else None


# ---- RULER's scoring (scripts/eval/evaluate.py, eval/synthetic/constants.py) ----

def postprocess(prediction: str) -> str:
  """RULER's clean-up of a prediction: control characters become new
  lines, surrounding white space goes."""
  return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def match_all(prediction: str, references) -> float:
  """string_match_all of one prediction: the fraction of the references
  it contains (case-insensitive)."""
  p = prediction.lower()
  return sum(r.lower() in p for r in references) / len(references)


def match_part(prediction: str, references) -> float:
  """string_match_part of one prediction: 1 if it contains any reference
  (case-insensitive)."""
  p = prediction.lower()
  return float(any(r.lower() in p for r in references))


def score(predictions, references, metric: str) -> float:
  """A task's score in percent over its samples, rounded as RULER does."""
  one = match_all if metric == "all" else match_part
  values = [one(postprocess(p), r) for p, r in zip(predictions, references)]
  return round(100 * sum(values) / len(values), 2)


def depth_table(results: dict, lengths, depths) -> np.ndarray:
  """Mean score (percent) of the single-needle NIAH tasks per depth (rows)
  and length (columns) of `suite`'s results; NaN where none ran."""
  total = np.zeros((len(depths), len(lengths)))
  seen = np.zeros_like(total)
  for name, by_length in results.items():
    if not name.startswith("niah_single"):
      continue
    for j, length in enumerate(lengths):
      for s in by_length.get(length, {}).get("samples", []):
        if s["depth"] in depths:
          i = list(depths).index(s["depth"])
          total[i, j] += 100 * s["score"]
          seen[i, j] += 1
  with np.errstate(invalid="ignore"):
    return np.where(seen > 0, total / np.maximum(seen, 1), np.nan)
