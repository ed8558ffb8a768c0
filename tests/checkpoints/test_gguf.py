import errno
import json
import os
import weakref
from pathlib import Path

import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import transformers
from flax import traverse_util

from longlora_jax import CheckpointError, LongLoraError, forward
from longlora_jax.checkpoints import gguf as gguf_io
from longlora_jax.checkpoints.checkpoint import Checkpoint, param_shardings
from longlora_jax.checkpoints.tokenizer import load_tokenizer
from longlora_jax.checkpoints.hf import expected_shapes
from longlora_jax.checkpoints.hub import BUILTIN
from longlora_jax.model.config import LlamaConfig, RopeScaling
from longlora_jax.model.generation import generate
from longlora_jax.parallel.sharding import make_mesh
from tests.conftest import SHARED_TOKENIZER
from tests.references.hf_models import hf_logits, require, torch

DEMO_TOKENIZER = BUILTIN["demo"]
# GQA, q/k/v/o biases, 80-long rows (not whole q8_0 blocks), the demo's vocab
TINY = dict(vocab_size=259, hidden_size=64, intermediate_size=80,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, qkv_bias=True, o_bias=True)
PLAIN = {**TINY, "qkv_bias": False, "o_bias": False}
# q8_0 stores each block of 32 as round(x / d) * f16(d), d = max|x| / 127:
# at most half a step, plus 127 steps of f16's rounding of d (2^-11).
Q8_STEPS = 0.5 + 127 * 2.0**-11
# q8_0's logits against the unquantized model's, relative to the largest:
# each weight off by half a step (0.4%) at most, through ~30 matmuls.
Q8_LOGITS = 5e-2
TEXTS = ("def f(x):\n    return x ** 2  # squares 12345\n",
         "Hello, World! It's 3.14159 and 1000000 ducks.")


def _random_params(config, seed=0):
  """Every parameter random: no layout error hides behind zeros or ones."""
  rng = np.random.default_rng(seed)
  return traverse_util.unflatten_dict({
      path: jnp.asarray((1.0 if path[-2].endswith("norm") else 0.0)
                        + rng.normal(0, 0.1, shape).astype(np.float32))
      for path, shape in expected_shapes(config).items()})


def _undo_interleave(w, heads):
  """Meta's neighbour pairs back to HF's rotate-half halves, by hand."""
  return (w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


_NAMES = dict(  # ours -> llama.cpp's
    embed_tokens="token_embd", norm="output_norm", lm_head="output",
    input_layernorm="attn_norm", post_attention_layernorm="ffn_norm",
    q_proj="attn_q", k_proj="attn_k", v_proj="attn_v", o_proj="attn_output",
    gate_proj="ffn_gate", up_proj="ffn_up", down_proj="ffn_down")


def _hf_layout(config, params):
  """{llama.cpp name: the parameter as HF stores it (float32)}."""
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    leaf = "bias" if path[-1] == "bias" else "weight"
    hf = lambda v: np.asarray(v.T if path[-1] == "kernel" else v, np.float32)
    if path[0] != "layers":
      out[f"{_NAMES[path[0]]}.{leaf}"] = hf(value)
    for i in range(config.num_hidden_layers if path[0] == "layers" else 0):
      out[f"blk.{i}.{_NAMES[path[-2]]}.{leaf}"] = hf(value[i])
  return out


def _fields(reader):
  return {k: f.contents() for k, f in reader.fields.items()}


def _relative(a, b):  # to the largest logit
  return float(np.abs(a - b).max() / np.abs(b).max())


def _hf(path, tokenizer=False):
  """transformers' GGUF loader (de-permuting, dequantizing by itself)."""
  require("torch")
  auto = transformers.AutoTokenizer if tokenizer else (
      transformers.AutoModelForCausalLM)
  loaded = auto.from_pretrained(path.parent, gguf_file=path.name,
                                **{} if tokenizer else {"dtype": torch.float32})
  return loaded if tokenizer else loaded.eval()


def _llama_cpp():
  return pytest.importorskip("llama_cpp", reason="needs llama-cpp-python "
                             "0.3.36, which builds llama.cpp from source")


@pytest.fixture(scope="module")
def demo():
  """(checkpoint, float32 params, 300 tokens of what it learnt: Python)."""
  checkpoint = Checkpoint.open("demo")
  ids = checkpoint.tokenizer(Path(json.__file__).read_text()).input_ids
  return checkpoint, checkpoint.params("float32"), np.asarray([ids[:300]])


@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0"])
def test_tensors_and_metadata_read_back(tmp_path, qtype):
  config = LlamaConfig(**TINY).with_context(256)  # linear, factor 4
  params = _random_params(config)
  out = gguf_io.save_gguf(tmp_path / "m.gguf", config, params,
                          DEMO_TOKENIZER, qtype=qtype, name="tiny")
  reader = gguf.GGUFReader(out)
  want = _hf_layout(config, params)
  got = {t.name: t for t in reader.tensors}
  assert set(got) == set(want)
  for name, w in want.items():
    t = got[name]
    x = gguf.dequantize(t.data, t.tensor_type).reshape(w.shape)
    if heads := {"attn_q": 4, "attn_k": 2}.get(name.split(".")[-2]):
      x = _undo_interleave(x, heads)
    kind = "F32" if w.ndim == 1 else "F16" if qtype == "f16" or (
        qtype == "q8_0" and w.shape[1] % 32) else qtype.upper()
    assert t.tensor_type.name == kind, name
    if kind == "Q8_0":  # within the bound of each block of 32
      d = np.abs(w).reshape(-1, 32).max(axis=1, keepdims=True) / 127
      assert (np.abs(x - w).reshape(-1, 32) <= Q8_STEPS * d + 1e-9).all()
    else:  # exactly the values rounded to the type
      np.testing.assert_array_equal(x, w.astype(dict(
          F32=np.float32, F16=np.float16, BF16=ml_dtypes.bfloat16)[kind]))
  assert _fields(reader).items() >= {
      "general.architecture": "llama", "general.name": "tiny",
      "llama.context_length": 256, "llama.rope.scaling.type": "linear",
      "llama.rope.scaling.factor": 4.0, "llama.attention.head_count_kv": 2,
      "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
      "tokenizer.ggml.add_bos_token": True}.items()
  assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_yarn_and_llama3_rope_as_llama_cpp_reads_them(tmp_path):
  config = LlamaConfig(**TINY).with_context(256, rope="yarn")
  fields = _fields(gguf.GGUFReader(gguf_io.save_gguf(
      tmp_path / "yarn.gguf", config, _random_params(config),
      DEMO_TOKENIZER)))
  assert [fields[f"llama.{k}"] for k in (
      "rope.scaling.type", "rope.scaling.factor", "context_length",
      "rope.scaling.original_context_length")] == ["yarn", 4.0, 256, 64]
  # llama3: no scaling keys; llama.cpp divides each inverse frequency by
  # the rope_freqs tensor's factor, which must give transformers' ones.
  config = LlamaConfig(**{**TINY, "max_position_embeddings": 256},
                       rope_theta=5e5, rope_scaling=RopeScaling(
                           8.0, "llama3", 32, 1.0, 4.0))
  reader = gguf.GGUFReader(gguf_io.save_gguf(
      tmp_path / "llama3.gguf", config, _random_params(config),
      DEMO_TOKENIZER))
  assert "llama.rope.scaling.type" not in reader.fields
  assert _fields(reader)["llama.context_length"] == 256
  factors = {t.name: t for t in reader.tensors}["rope_freqs.weight"].data
  require("torch")  # transformers' llama3 frequencies are the reference
  scaled = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](
      transformers.LlamaConfig(**config.to_hf_dict()), "cpu")[0].numpy()
  base = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)
  np.testing.assert_allclose(factors, base / scaled, rtol=1e-5)


@pytest.mark.parametrize("qtype,bound", [("f16", 1e-2), ("bf16", 1e-2),
                                         ("q8_0", Q8_LOGITS)])
def test_demo_logits_and_greedy_through_transformers(tmp_path, demo, qtype,
                                                     bound):
  checkpoint, params, ids = *demo[:2], demo[2][:, :96]
  out = gguf_io.save_gguf(tmp_path / "demo.gguf", checkpoint.config, params,
                          checkpoint.directory, qtype=qtype)
  model = _hf(out)
  ours = np.asarray(forward(checkpoint.config, params, jnp.asarray(ids)))
  assert _relative(hf_logits(model, ids), ours) <= bound
  if qtype == "f16":
    new = generate(checkpoint.config, params, ids, max_new_tokens=16,
                   eos_token_id=None)
    theirs = model.generate(torch.tensor(ids), max_new_tokens=16,
                            do_sample=False, eos_token_id=None)
    np.testing.assert_array_equal(theirs[:, ids.shape[1]:].numpy(), new)


FAMILIES = {  # transformers' GGUF loader reads no head_dim for qwen3
    "qwen2": dict(model_type="qwen2", qkv_bias=True),
    "qwen3": dict(model_type="qwen3", qk_norm=True, head_dim=128),
    "mistral": dict(model_type="mistral"),
    "olmo2": dict(model_type="olmo2", qk_norm=True,
                  qk_norm_over="projection", norm_placement="post"),
    "llama_tied": dict(tie_word_embeddings=True, head_dim=24),
    "llama_biases": dict(qkv_bias=True, o_bias=True),
    # original context 8, factor 8: 60 tokens need all of its factors
    "llama3": dict(rope_theta=5e5, rope_scaling=RopeScaling(
        8.0, "llama3", 8, 1.0, 4.0))}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reader", ["transformers", "llama.cpp"])
def test_each_family_runs_as_ours(tmp_path, family, reader):
  if reader == "transformers" and family in ("llama_biases", "llama3", "olmo2"):
    pytest.skip("transformers' GGUF loader reads no llama bias, scaling, olmo2")
  config = LlamaConfig(**{**PLAIN, **FAMILIES[family]})
  params = _random_params(config)
  out = gguf_io.save_gguf(tmp_path / "m.gguf", config, params,
                          DEMO_TOKENIZER, qtype="f32")
  ids = np.random.default_rng(0).integers(3, config.vocab_size, (1, 60))
  ours = np.asarray(forward(config, params, jnp.asarray(ids)))
  if reader == "transformers":
    assert _relative(hf_logits(_hf(out), ids), ours) <= 1e-5
  else:  # llama.cpp's KV cache is float16
    llm = _llama_cpp().Llama(str(out), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(ids[0].tolist())
    assert _relative(np.asarray(llm.scores[:60]), ours[0]) <= 1e-2


def _sentencepiece_tokenizer(directory):
  """A 400-piece SentencePiece BPE set up as Llama 2's, on Python source."""
  import sentencepiece
  directory.mkdir()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(Path(json.__file__).read_text().splitlines()),
      model_prefix=str(directory / "tokenizer"), vocab_size=400,
      model_type="bpe", byte_fallback=True, character_coverage=1.0,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, minloglevel=2)
  (directory / "tokenizer_config.json").write_text(json.dumps(dict(
      add_bos_token=True, bos_token="<s>", eos_token="</s>", legacy=True,
      chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")))
  return sentencepiece.SentencePieceProcessor(
      model_file=str(directory / "tokenizer.model"))


def test_sentencepiece_model_through_transformers(tmp_path):
  sp = _sentencepiece_tokenizer(tmp_path / "tok")
  config = LlamaConfig(**{**PLAIN, "vocab_size": 416})  # 16 unused ids
  params = _random_params(config)
  out = gguf_io.save_gguf(tmp_path / "sp.gguf", config, params,
                          tmp_path / "tok")
  fields, ours = _fields(gguf.GGUFReader(out)), load_tokenizer(tmp_path / "tok")
  assert fields["tokenizer.ggml.tokens"][:400] == [
      sp.IdToPiece(i) for i in range(400)]
  np.testing.assert_array_equal(fields["tokenizer.ggml.scores"][:400], [
      sp.GetScore(i) for i in range(400)])
  types = fields["tokenizer.ggml.token_type"]
  assert types[:4] == [2, 3, 3, 6] and types[400:] == [5] * 16
  assert [fields[f"tokenizer.{k}"] for k in (
      "ggml.model", "ggml.bos_token_id", "ggml.eos_token_id",
      "ggml.add_bos_token", "chat_template")] == [
          "llama", 1, 2, True, ours.chat_template]
  theirs = _hf(out, tokenizer=True)
  for text in TEXTS:
    assert theirs(text).input_ids == ours(text).input_ids == [1] + sp.encode(
        text)
  ids = np.asarray([ours(TEXTS[1]).input_ids])
  model = _hf(out)
  logits = np.asarray(forward(config, params, jnp.asarray(ids)))
  assert _relative(hf_logits(model, ids), logits) <= 1e-2
  new = generate(config, params, ids, max_new_tokens=8, eos_token_id=None)
  hf = model.generate(torch.tensor(ids), max_new_tokens=8, do_sample=False,
                      eos_token_id=None)
  np.testing.assert_array_equal(hf[:, ids.shape[1]:].numpy(), new)


def _bpe_tokenizer(directory, pre: str):
  """A byte-level BPE trained on Python source, cutting text as llama.cpp's
  pre-tokenizer `pre` does (the regex transformers' GGUF reader gives it)."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  from tokenizers import trainers
  tok = Tokenizer(models.BPE())
  if pre == "gpt-2":
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  else:
    splits = pytest.importorskip(
        "transformers.integrations.gguf.gguf_tokenizer_mapping"
    ).GGUF_PRE_TOKENIZER_SPLITS
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(splits[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer, end = trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()), "<|endoftext|>"
  tok.train_from_iterator([Path(json.__file__).read_text()], trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok,
                                              bos_token=end, eos_token=end)
  fast.save_pretrained(directory)
  return fast


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "tekken", "gpt-2"])
def test_byte_level_pre_tokenizer_and_merges(tmp_path, pre):
  fast = _bpe_tokenizer(tmp_path / "tok", pre)
  config = LlamaConfig(**{**TINY, "vocab_size": len(fast)})
  out = gguf_io.save_gguf(tmp_path / "m.gguf", config,
                          _random_params(config), tmp_path / "tok")
  fields = _fields(gguf.GGUFReader(out))
  assert fields["tokenizer.ggml.pre"] == pre
  merges = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())[
      "model"]["merges"]
  assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
  assert fields["tokenizer.ggml.token_type"][0] == gguf.TokenType.CONTROL
  assert fields["tokenizer.ggml.add_bos_token"] is False  # as `fast`
  theirs = _hf(out, tokenizer=True)
  for text in TEXTS:
    assert (theirs(text, add_special_tokens=False).input_ids
            == fast(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("change,message", [
    (dict(rope_scaling=RopeScaling(2.0, "dynamic")), "dynamic"),
    (dict(rope_scaling=RopeScaling(4.0, "yarn", 64, beta_fast=16.0)),
     "beta_fast 32"),
    (dict(model_type="qwen2", rope_scaling=RopeScaling(
        2.0, "llama3", 32, 1.0, 4.0)), "no llama3 RoPE"),
    (dict(model_type="qwen3", qk_norm=True, o_bias=True), "no o_proj bias"),
    (dict(sliding_window=32), "without a sliding window"),
    (dict(model_type="phi3"), "GGUF export of phi3")])
def test_unsupported_configs_refused_in_one_line(tmp_path, change, message):
  config = LlamaConfig(**{**PLAIN, **change})
  with pytest.raises(CheckpointError, match=message) as e:
    gguf_io.save_gguf(tmp_path / "m.gguf", config, _random_params(config),
                      DEMO_TOKENIZER)
  assert "\n" not in str(e.value)
  assert not list(tmp_path.iterdir())


def test_refusals_and_full_disks_leave_files_alone(tmp_path, monkeypatch):
  config = LlamaConfig(**PLAIN)
  params = _random_params(config)
  (tmp_path / "old.gguf").write_text("old")
  (tmp_path / "empty").mkdir()
  gathered, gather = [], gguf_io.to_host

  def full_disk(*args, **kwargs):
    if len(gathered) == 4:  # the disk fills at the fifth tensor
      raise OSError(errno.ENOSPC, "No space left on device")
    gathered.append(1)
    return gather(*args, **kwargs)
  monkeypatch.setattr(gguf_io, "to_host", full_disk)
  for path, tokenizer, qtype, message in [
      ("m", DEMO_TOKENIZER, "q4_k", "choose one of f32, f16, bf16, q8_0"),
      ("old", DEMO_TOKENIZER, "f16", "pass overwrite=True"),
      ("m", tmp_path / "empty", "f16", "no tokenizer.model or")]:
    with pytest.raises(CheckpointError, match=message):
      gguf_io.save_gguf(tmp_path / f"{path}.gguf", config, params, tokenizer,
                        qtype=qtype)
  assert not gathered  # refused before any tensor was gathered
  with pytest.raises(LongLoraError, match="no space left on device"):
    gguf_io.save_gguf(tmp_path / "old.gguf", config, params, DEMO_TOKENIZER,
                      overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "old.gguf"]
  assert (tmp_path / "old.gguf").read_text() == "old"


def test_streams_one_tensor_at_a_time(tmp_path, demo, monkeypatch):
  # Sharded over 8 devices; each tensor (layer) written before the next.
  checkpoint, config = demo[0], demo[0].config
  params = checkpoint.params("float32", param_shardings(
      config, make_mesh("fsdp=4,tensor=2")))
  live, alive_at_gather, gathered, gather = set(), [], [], gguf_io.to_host

  def tracked(*args, **kwargs):
    alive_at_gather.append(len(live))
    gathered.append((x := gather(*args, **kwargs)).nbytes)
    live.add(id(x))
    weakref.finalize(x, live.discard, id(x))
    return x
  monkeypatch.setattr(gguf_io, "to_host", tracked)
  out = gguf_io.save_gguf(tmp_path / "demo.gguf", config, params,
                          checkpoint.directory, qtype="q8_0")
  assert max(alive_at_gather) == 0 and not live
  assert len(gathered) == len(gguf.GGUFReader(out).tensors)
  assert sum(gathered) == 4 * sum(  # every weight once
      int(np.prod(s)) for s in expected_shapes(config).values())


@pytest.mark.parametrize("rope", ["linear", "yarn"])
def test_llama_cpp_greedy_beyond_the_native_context(tmp_path, demo, rope):
  llama_cpp = _llama_cpp()
  checkpoint, params, ids = demo  # 300 tokens: beyond the native 256
  config = checkpoint.config.with_context(1024, rope=rope)  # factor 4
  out = gguf_io.save_gguf(tmp_path / "demo.gguf", config, params,
                          checkpoint.directory)
  new = generate(config, params, ids, max_new_tokens=16, eos_token_id=None)
  seq = np.concatenate([ids, new], axis=1)
  llm = llama_cpp.Llama(str(out), n_ctx=1024, logits_all=True, verbose=False)
  llm.eval(seq[0].tolist())  # its greedy pick after each prefix of ours
  ours = np.asarray(forward(config, params, jnp.asarray(seq)))[0]
  theirs = np.asarray(llm.scores[:seq.shape[1]])
  assert _relative(theirs, ours) <= 1e-2
  steps = slice(ids.shape[1] - 1, seq.shape[1] - 1)
  top2 = np.sort(ours[steps], axis=-1)[:, -2:]  # f16 may swap near-ties:
  tie = top2[:, 1] - top2[:, 0] < 1e-3 * np.abs(ours).max()
  assert ((theirs[steps].argmax(-1) == new[0]) | tie).all() and not tie.all()


@pytest.mark.parametrize("tokenizer", [
    "sentencepiece", "llama-bpe", "qwen2", pytest.param("llama2", marks=(
        pytest.mark.skipif(not os.path.isdir(SHARED_TOKENIZER),
                           reason="needs the Llama-2 tokenizer fixture")))])
def test_llama_cpp_tokenizes_as_the_checkpoint(tmp_path, tokenizer):
  llama_cpp = _llama_cpp()
  directory = Path(SHARED_TOKENIZER) if tokenizer == "llama2" else (
      tmp_path / "tok")
  if tokenizer == "sentencepiece":
    _sentencepiece_tokenizer(directory)
  elif tokenizer != "llama2":
    _bpe_tokenizer(directory, tokenizer)
  ours = load_tokenizer(directory)
  config = LlamaConfig(**{**TINY, "vocab_size": len(ours)})
  out = gguf_io.save_gguf(tmp_path / "m.gguf", config,
                          _random_params(config), directory)
  llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
  assert (llm.token_bos(), llm.token_eos()) == (ours.bos_token_id,
                                                ours.eos_token_id)
  for text in TEXTS:
    assert llm.tokenize(text.encode()) == ours(text).input_ids
