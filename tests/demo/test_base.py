"""The demo's base model: the built-in checkpoint is the tiny config, and
its tokenizer is one token per UTF-8 byte after BOS, as
`save_byte_tokenizer` writes it."""

from transformers import AutoTokenizer

from longlora_jax import LlamaConfig
from longlora_jax.checkpoints import hub
from longlora_jax.demo.base import DEMO_CONFIG, save_byte_tokenizer


def test_demo_checkpoint_is_a_loadable_hf_model():
  directory = hub.resolve_checkpoint("demo")
  assert LlamaConfig.from_pretrained(directory) == DEMO_CONFIG
  tok = AutoTokenizer.from_pretrained(directory)
  text = "naïve café, 100% ✓"
  ids = tok(text)["input_ids"]
  assert ids[0] == DEMO_CONFIG.bos_token_id
  # BOS, then one token per byte of the text with a space prepended (as
  # Llama's tokenizer does), so " 12345" inside a prompt tokenises as alone.
  assert len(ids) == 2 + len(text.encode("utf-8"))
  assert ids[2:] == tok(" " + text)["input_ids"][3:]
  assert tok.decode(ids, skip_special_tokens=True) == text
  assert len(tok) == DEMO_CONFIG.vocab_size


def test_the_config_is_the_documented_tiny_model():
  # 256 bytes after <pad>, <s>, </s>; native context 256.
  c = DEMO_CONFIG
  assert (c.vocab_size, c.hidden_size, c.num_hidden_layers,
          c.num_attention_heads, c.max_position_embeddings) == (
              259, 128, 4, 4, 256)
  assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (0, 1, 2)


def test_saved_tokenizer_maps_bytes_by_gpt2s_byte_table(tmp_path):
  # GPT-2's byte-to-unicode table (its published algorithm, written out
  # here): printable Latin-1 bytes stand for themselves, the others for
  # 256 + their rank; our ids are 3 + the byte's rank in that alphabet's
  # sorted order.
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  char = {b: chr(b) for b in printable}
  char.update({b: chr(256 + n) for n, b in enumerate(
      b for b in range(256) if b not in printable)})
  rank = {c: i for i, c in enumerate(sorted(char.values()))}
  save_byte_tokenizer(tmp_path)
  tok = AutoTokenizer.from_pretrained(tmp_path)
  text = "Ahab\t€ 9"
  want = [1] + [3 + rank[char[b]] for b in (" " + text).encode("utf-8")]
  assert tok(text)["input_ids"] == want
  assert tok.decode(want, skip_special_tokens=True) == text
  assert tok.eos_token_id == 2 and tok.pad_token_id == 0
