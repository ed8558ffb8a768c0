import io

import jax
import numpy as np
import pytest
import transformers

from eval import chat
from longlora_jax import LlamaConfig, init_params, save_hf
from longlora_jax.model.generation import generate


class PieceTokenizer:
  """Decodes ids as text pieces; id 9 is half of a two-token character."""
  pieces = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 9: "\ufffd"}

  def decode(self, ids, skip_special_tokens=True):
    text = "".join(self.pieces[i] for i in ids)
    return text.replace("\ufffd\ufffd", "é")


def test_streamer_prints_the_text_once_in_order():
  out = io.StringIO()
  streamer = chat.Streamer(PieceTokenizer(), out)
  for token in (1, 2, 9, 9, 3, 4):
    streamer(np.array([token]))
  assert out.getvalue() == "Helloé world"


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                   unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
  tok_dir = tmp_path_factory.mktemp("tok")
  fast.save_pretrained(tok_dir)
  cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                    num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, initializer_range=0.5,
                    eos_token_id=None)
  out = tmp_path_factory.mktemp("m") / "model"
  return save_hf(cfg, init_params(cfg, jax.random.key(0)), out,
                 tokenizer_from=tok_dir)


def test_chat_streams_every_token(tiny_chat_model, tmp_path, capsys, monkeypatch):
  (tmp_path / "doc.txt").write_text("w1 w2 w3 " * 30)
  seen = []
  real = generate

  def spy(*args, on_token=None, **kwargs):
    return real(*args, on_token=lambda t: (seen.append(int(t[0])), on_token(t)),
                **kwargs)
  monkeypatch.setattr(chat, "generate", spy)
  chat.main(["--ckpt", str(tiny_chat_model), "--material",
             str(tmp_path / "doc.txt"), "--question", "w4 w5", "--max-gen-len",
             "7", "--dtype", "float32", "--temperature", "0"])
  captured = capsys.readouterr()
  assert len(seen) == 7
  words = captured.out.split()
  assert words == [f"w{t - 3}" for t in seen if t >= 3]
  assert "prompt: " in captured.err and "tokens/s" in captured.err
  # The prompt is 90 words of material, the question and the [INST] wrapper,
  # longer than the 64 positions this model was trained for.
  assert "warning: the prompt is longer" in captured.err
