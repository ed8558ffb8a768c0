"""The built-in demo's base model: a tiny Llama's config and its byte-level
tokenizer.

The base model is the project's own: a byte-level Llama with a native
context of 256 tokens, pretrained by `python -m train.pretrain_demo` on the
Python standard library's source (`longlora_jax.demo.stdlib`) and shipped
as the built-in checkpoint `demo` (`longlora_jax/checkpoints/builtin/demo/`).
`python -m train.extend` with no arguments extends it to 1024 tokens on a
laptop CPU (`longlora_jax.demo.defaults`).
"""

import json
from pathlib import Path

from longlora_jax.model.config import LlamaConfig
from longlora_jax.core.files import write_json

# 256 byte tokens after the three specials.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
NATIVE_CONTEXT = 256
DEMO_CONFIG = LlamaConfig(
    vocab_size=256 + len(SPECIAL_TOKENS), hidden_size=128,
    intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
    max_position_embeddings=NATIVE_CONTEXT, bos_token_id=1, eos_token_id=2,
    pad_token_id=0, tie_word_embeddings=False)


def save_byte_tokenizer(directory: Path) -> None:
  """A byte-level tokenizer: one token per UTF-8 byte, BOS first.

  Like Llama's SentencePiece tokenizer it prepends a space to the text (and
  the decoder removes it), so "12345" alone encodes as the " 12345" that
  follows "The pass key is": the passkey protocol compares those ids.
  """
  from tokenizers import (Tokenizer, decoders, models, normalizers,
                          pre_tokenizers, processors)
  from transformers import PreTrainedTokenizerFast
  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
  for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
    vocab[ch] = len(vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.normalizer = normalizers.Prepend(" ")
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                               use_regex=False)
  tok.decoder = decoders.Sequence([decoders.ByteLevel(),
                                   decoders.Strip(" ", 1, 0)])
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                 bos_token="<s>", eos_token="</s>")
  fast.save_pretrained(directory)
  # A class every transformers release knows (5.x writes its own name).
  config_file = Path(directory) / "tokenizer_config.json"
  cfg = json.loads(config_file.read_text())
  write_json(config_file, {**cfg, "tokenizer_class": "PreTrainedTokenizerFast"})
