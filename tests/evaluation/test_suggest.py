"""The evaluation commands a trained model is given: at the lengths it was
trained for, with the passkey schedule its tokenizer takes."""

from pathlib import Path

from longlora_jax.evaluation.suggest import commands, ruler_lengths
from longlora_jax.demo.base import save_byte_tokenizer


def test_ruler_lengths_double_from_the_native_length_to_the_trained_one():
  assert ruler_lengths(4096, 100000) == [4096, 8192, 16384, 32768, 65536,
                                         100000]
  assert ruler_lengths(256, 1024) == [256, 512, 1024]
  assert ruler_lengths(4096, 4096) == [4096]


def test_the_three_evaluations_are_printed_at_the_trained_length(tmp_path):
  # A base with Llama-2's tokenizer class: the official passkey schedule.
  from transformers import LlamaTokenizer
  LlamaTokenizer().save_pretrained(tmp_path)
  tokenizer = LlamaTokenizer.from_pretrained(tmp_path)
  text = commands("long-context", Path("runs/x/hf"), tokenizer=tokenizer,
                  data="pg19.jsonl", native=4096, ctx=100000)
  lines = [line.strip() for line in text.splitlines()]
  assert ("python -m eval.perplexity --ckpt runs/x/hf --data pg19.jsonl "
          "--seq-len 4096 100000") in lines
  assert ("python -m eval.passkey --ckpt runs/x/hf --max-tokens 100000 "
          "--interval 12500") in lines
  assert ("python -m eval.ruler --ckpt runs/x/hf --lengths 4096 8192 16384 "
          "32768 65536 100000") in lines


def test_passkey_intervals_per_protocol(tmp_path):
  from transformers import AutoTokenizer, LlamaTokenizer
  LlamaTokenizer().save_pretrained(tmp_path / "llama")
  save_byte_tokenizer(tmp_path / "bytes")
  passkey = lambda name, ctx: [
      line for line in commands(
          "long-context", "m", tokenizer=AutoTokenizer.from_pretrained(
              tmp_path / name), data="d", native=256, ctx=ctx).splitlines()
      if "eval.passkey" in line][0].split()[-1]
  # Official lengths: eighths of the context, but none under 274 tokens
  # (274 x 3.75 characters round down to 1024 of filler; fewer to none).
  assert passkey("llama", 8192) == "1024"
  assert passkey("llama", 1024) == "274"
  # Measured lengths land where asked: quarters (the README's 256, 512,
  # 768 and 1024 for the demo).
  assert passkey("bytes", 1024) == "256"


def test_an_instruction_model_is_asked_about_a_document():
  assert commands("chat", "runs/s/hf", tokenizer=None, data="d", native=1,
                  ctx=2) == (
      "ask the merged model about a long document with:\n"
      "  python -m eval.chat --ckpt runs/s/hf --material FILE.txt "
      "--question \"...\"")
