from pathlib import Path

from longlora_jax.config import LlamaConfig
from longlora_jax.training.export import print_commands, ruler_lengths
from longlora_jax.training.recipe import RunSpec


def test_ruler_lengths_double_from_the_native_length_to_the_trained_one():
  assert ruler_lengths(4096, 100000) == [4096, 8192, 16384, 32768, 65536,
                                         100000]
  assert ruler_lengths(256, 1024) == [256, 512, 1024]
  assert ruler_lengths(4096, 4096) == [4096]


def test_the_three_evaluations_are_printed_at_the_trained_length(capsys):
  config = LlamaConfig().with_context(100000)  # Llama-2's 4096, x25
  spec = RunSpec(ckpt="hf:meta-llama/Llama-2-7b-hf", ctx=100000,
                 base_config={}, data="pg19.jsonl")
  print_commands(spec, config, {"hf": Path("runs/x/hf")})
  lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
  assert ("python -m eval.perplexity --ckpt runs/x/hf --data pg19.jsonl "
          "--seq-len 4096 100000") in lines
  assert ("python -m eval.passkey --ckpt runs/x/hf --max-tokens 100000 "
          "--interval 12500") in lines
  assert ("python -m eval.ruler --ckpt runs/x/hf --lengths 4096 8192 16384 "
          "32768 65536 100000") in lines
