"""The built-in demo checkpoint: a tiny Llama with a byte-level tokenizer.

Made locally (no network) so every command has something to run on.
"""

import json
from pathlib import Path

import jax

from longlora_jax.config import LlamaConfig
from longlora_jax.hf_io import save_hf
from longlora_jax.model import init_params

DEMO_DIR = Path("runs") / "demo" / "base"
# 256 byte tokens after the three specials.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
DEMO_CONFIG = LlamaConfig(
    vocab_size=256 + len(SPECIAL_TOKENS), hidden_size=128,
    intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
    max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    pad_token_id=0, tie_word_embeddings=False)


def save_byte_tokenizer(directory: Path) -> None:
  """A byte-level BPE tokenizer with no merges: one token per UTF-8 byte."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  byte_chars = pre_tokenizers.ByteLevel.alphabet()
  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
  for ch in sorted(byte_chars):
    vocab[ch] = len(vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
      eos_token="</s>", add_bos_token=True)
  fast.save_pretrained(directory)
  # Prepend BOS as Llama tokenizers do.
  config_file = directory / "tokenizer_config.json"
  cfg = json.loads(config_file.read_text())
  cfg["add_bos_token"] = True
  config_file.write_text(json.dumps(cfg, indent=2))


def demo_checkpoint(directory: Path = DEMO_DIR, seed: int = 0) -> Path:
  """A random tiny Llama in HF format (built once, then reused)."""
  directory = Path(directory)
  if (directory / "config.json").exists():
    return directory
  tokenizer_dir = directory.parent / "tokenizer"
  if not (tokenizer_dir / "tokenizer.json").exists():
    save_byte_tokenizer(tokenizer_dir)
  params = init_params(DEMO_CONFIG, jax.random.key(seed))
  return save_hf(DEMO_CONFIG, params, directory, tokenizer_from=tokenizer_dir)
