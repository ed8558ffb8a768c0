import json

import pytest

from longlora_jax.evaluation.ruler import sources as rs
from longlora_jax.core.errors import LongLoraError


def test_haystack_from_files(tmp_path):
  (tmp_path / "a.txt").write_text("alpha " * 600)
  (tmp_path / "b.md").write_text("beta " * 600)
  (tmp_path / "c.bin").write_text("gamma " * 600)
  text = rs.read_haystack(tmp_path)
  assert "alpha" in text and "beta" in text and "gamma" not in text
  with pytest.raises(LongLoraError, match="at least 1000"):
    rs.read_haystack(tmp_path / "a.txt")
  with pytest.raises(LongLoraError, match="no such file"):
    rs.read_haystack(tmp_path / "nope")
  assert len(rs.pydoc_text()) > 100_000


def test_haystack_words_and_essay():
  src = rs.make_sources("The  cat\n sat on 12 mats; the cat-nap ended.")
  assert src.essay == ("The", "cat", "sat", "on", "12", "mats;", "the",
                       "cat-nap", "ended.")
  assert src.words == ("cat", "ended", "mats", "nap", "sat", "the")


def test_hotpotqa_documents_are_title_and_sentences(tmp_path):
  data = [{"question": "Who?", "answer": "Ann",
           "context": [["T1", ["A b.", " C d."]], ["T2", ["E."]]]}]
  (tmp_path / "h.json").write_text(json.dumps(data))
  questions, docs = rs.read_hotpotqa(tmp_path / "h.json")
  assert docs == ["T1\nA b. C d.", "T2\nE."]
  assert questions == [{"query": "Who?", "answers": ["Ann"], "docs": [0, 1],
                        "more": []}]
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(LongLoraError, match="--hotpotqa .*cannot read it"):
    rs.read_hotpotqa(tmp_path / "bad.json")
