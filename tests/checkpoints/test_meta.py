"""Meta's release layout against Meta's own code: tiny models built with
llama_models' reference `Transformer` (its fairscale layers stood in for by
one-rank torch layers), saved as Meta saves them, one file or
tensor-parallel shards, and loaded by us."""

import importlib
import json
import os
import shutil
import sys
import types
from pathlib import Path
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from longlora_jax import CheckpointError, forward
from longlora_jax.checkpoints import meta, pth
from longlora_jax.checkpoints.checkpoint import (Checkpoint, load_model,
                                                 param_shardings)
from longlora_jax.parallel.sharding import make_mesh
from tests.references import hf_models
from tests.references.hf_models import torch  # None without PyTorch

# Meta's split of each tensor over its model-parallel ranks (fairscale's
# ColumnParallelLinear splits the output rows, RowParallelLinear the input
# columns; Llama 1/2's ParallelEmbedding the embedding dimension).
_LLAMA2_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
                 "wo": 1, "w2": 1, "tok_embeddings": 1}
_LLAMA2 = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-5,
               vocab_size=-1)


@pytest.fixture(scope="module")
def reference():
  """(llama_models.llama3.model, llama_models.checkpoint) on a stand-in
  fairscale: one rank, its layers plain nn.Linear / nn.Embedding (Meta's
  code needs only their constructors and forward)."""
  hf_models.require("torch", "llama_models")
  nn = torch.nn

  class Linear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, **_):
      super().__init__(in_features, out_features, bias=bias)

  class Embedding(nn.Embedding):
    def __init__(self, num_embeddings, embedding_dim, **_):
      super().__init__(num_embeddings, embedding_dim)
  names = ("fairscale", "fairscale.nn", "fairscale.nn.model_parallel",
           "fairscale.nn.model_parallel.layers",
           "fairscale.nn.model_parallel.initialize")
  fakes = {name: types.ModuleType(name) for name in names}
  layers, init = fakes[names[3]], fakes[names[4]]
  layers.ColumnParallelLinear = layers.RowParallelLinear = Linear
  layers.VocabParallelEmbedding = Embedding
  init.get_model_parallel_world_size = lambda: 1
  init.get_model_parallel_rank = lambda: 0
  with mock.patch.dict(sys.modules, fakes):
    for name in ("llama_models.llama3.model", "llama_models.checkpoint"):
      sys.modules.pop(name, None)
    return (importlib.import_module("llama_models.llama3.model"),
            importlib.import_module("llama_models.checkpoint"))


def _meta_model(reference, vocab_size, seed=0, **args):
  """Meta's Transformer with random weights (norms around 1)."""
  torch.manual_seed(seed)
  model = reference[0].Transformer(reference[0].ModelArgs(
      vocab_size=vocab_size, max_batch_size=2, max_seq_len=32, **args)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name
              else 0.3 * torch.randn_like(p))
  return model


def _split(state, shards, rules):
  """`state` as Meta's `shards` ranks hold it: each tensor chunked on its
  axis in `rules` (by the tensor's module name), the rest replicated."""
  axis = lambda name: rules.get(name.split(".")[-2])
  return [{k: v.chunk(shards, axis(k))[s].clone() if axis(k) is not None
           else v.clone() for k, v in state.items()} for s in range(shards)]


def _save(directory, params, states, tokenizer=None):
  directory.mkdir(parents=True)
  (directory / "params.json").write_text(json.dumps(params))
  for i, state in enumerate(states):
    torch.save(state, directory / f"consolidated.{i:02d}.pth")
  if tokenizer is not None:
    (directory / "tokenizer.model").write_bytes(tokenizer)
  return directory


def _sentencepiece(pieces: int) -> bytes:
  from sentencepiece import sentencepiece_model_pb2 as pb
  model = pb.ModelProto()
  for i in range(pieces):
    piece = model.pieces.add()
    piece.piece, piece.score = ("<unk>" if i == 0 else f"p{i}"), 0.0
    piece.type = piece.UNKNOWN if i == 0 else piece.NORMAL
  return model.SerializeToString()


def _tiktoken(ranks: int) -> bytes:
  import base64
  return b"".join(base64.b64encode(i.to_bytes(2, "big")) + b" %d\n" % i
                  for i in range(ranks))


def _reshard(reference, states, new, n_kv):
  """`states` (Meta's ranks) resharded to `new` ranks by Meta's own code:
  llama_models.checkpoint's maybe_reshard_state_dict, less the loading."""
  ckpt, old = reference[1], len(states)
  size = max(new // old, 1)
  return [ckpt.reshard_mp([states[i] for i in ckpt.map_mp_rank(old, new, r)],
                          size=size, rank=r % size,
                          repeat_qk_qv=max(new // n_kv, 1))
          for r in range(new)]


def _cases(reference, tmp_path, name):
  """(directory, Meta's model, mesh) of each layout Meta ships."""
  d = tmp_path / name
  if name == "llama2_7b":  # one file, vocab from tokenizer.model
    model = _meta_model(reference, 96, rope_theta=10000.0,
                        **{k: v for k, v in _LLAMA2.items() if k != "vocab_size"})
    state = {**model.state_dict(), "rope.freqs": torch.ones(8)}
    return _save(d, _LLAMA2, [state], _sentencepiece(96)), model, None
  if name == "llama2_13b":  # 2 shards, MHA, vocab from the weights
    model = _meta_model(reference, 128, rope_theta=10000.0,
                        **{k: v for k, v in _LLAMA2.items() if k != "vocab_size"})
    return (_save(d, _LLAMA2, _split(model.state_dict(), 2, _LLAMA2_SPLIT)),
            model, "fsdp=8")
  if name == "llama2_70b":  # 8 shards, one kv head each
    params = dict(dim=128, n_layers=2, n_heads=16, n_kv_heads=8,
                  multiple_of=64, ffn_dim_multiplier=1.3, norm_eps=1e-5,
                  vocab_size=-1)
    model = _meta_model(reference, 128, rope_theta=10000.0,
                        **{k: v for k, v in params.items() if k != "vocab_size"})
    return (_save(d, params, _split(model.state_dict(), 8, _LLAMA2_SPLIT)),
            model, "fsdp=4,tensor=2")
  llama3 = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, multiple_of=32,
                ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
                use_scaled_rope=True, vocab_size=128)
  model = _meta_model(reference, **llama3)
  if name == "llama3_1_8b":  # one file, scaled RoPE, GQA
    return _save(d, llama3, [model.state_dict()]), model, "fsdp=2,tensor=4"
  # 8 shards from 2 (as 405B's MP16 from MP8): Meta's resharding
  # replicates each of the 2 kv heads over 4 consecutive shards.
  two = _reshard(reference, [model.state_dict()], 2, n_kv=2)
  return (_save(d, llama3, _reshard(reference, two, 8, n_kv=2)), model,
          "fsdp=4,tensor=2")


def _leaves(params):
  return traverse_util.flatten_dict(params).values()


CASES = ["llama2_7b", "llama2_13b", "llama2_70b", "llama3_1_8b",
         "llama3_replicated_kv"]


@pytest.mark.parametrize("name", CASES)
def test_logits_match_meta_reference(reference, tmp_path, name):
  directory, model, mesh = _cases(reference, tmp_path, name)
  checkpoint = Checkpoint.open(directory)
  config = checkpoint.config
  shardings = param_shardings(config, make_mesh(mesh)) if mesh else None
  params = checkpoint.params("float32", shardings)
  ids = hf_models.random_ids(config.vocab_size, 2, 24)
  ours = np.asarray(forward(config, params, jnp.asarray(ids)))
  theirs = model.forward(torch.tensor(ids), 0).numpy()
  error = np.abs(ours - theirs).max() / np.abs(theirs).max()
  print(f"{name}: max relative error {error:.2e}")
  assert error <= 1e-4, error
  if shardings is not None:
    flat = traverse_util.flatten_dict(params)
    for path, sharding in traverse_util.flatten_dict(shardings).items():
      assert flat[path].sharding == sharding, path


def test_each_device_reads_only_its_part(reference, tmp_path, monkeypatch):
  # Every byte read from the shards lands on a device that holds it: the
  # bytes read are the devices' parts, and no read is larger than one
  # device's part of one layer of one tensor.
  directory, _, mesh = _cases(reference, tmp_path, "llama2_70b")
  reads, block = [], pth.LazyTensor._block
  monkeypatch.setattr(pth.LazyTensor, "_block", lambda self, index: (
      reads.append((part := block(self, index)).nbytes) or part))
  checkpoint = Checkpoint.open(directory)
  shardings = param_shardings(checkpoint.config, make_mesh(mesh))
  reads.clear()
  params = checkpoint.params("float32", shardings)
  parts = [(s.data.nbytes, s.data.shape[0] if path[0] == "layers" else 1)
           for path, value in traverse_util.flatten_dict(params).items()
           for s in value.addressable_shards]
  assert sum(reads) == sum(n for n, _ in parts)
  assert max(reads) <= max(n // layers for n, layers in parts)
  assert max(reads) * 8 < max(v.nbytes for v in _leaves(params))


@pytest.mark.parametrize("dim,multiple_of,multiplier,width", [
    (4096, 256, None, 11008), (5120, 256, None, 13824),  # Llama 2 7B, 13B
    (8192, 4096, 1.3, 28672), (4096, 1024, 1.3, 14336),  # 70B, 3.1 8B
    (16384, 4096, 1.2, 53248), (2048, 256, 1.5, 8192),  # 3.1 405B, 3.2 1B
    (3072, 256, 1.0, 8192), (8192, 256, 1.0, 22016)])  # 3.2 3B, Code 34B
def test_ffn_width_of_released_models(dim, multiple_of, multiplier, width):
  # intermediate_size of each model's Hugging Face config.json.
  assert meta.ffn_width(dim, multiple_of, multiplier) == width


@pytest.mark.parametrize("params,vocab,context", [
    (dict(norm_eps=1e-6), 32000, 2048),  # Llama 1
    (dict(norm_eps=1e-5), 32000, 4096),  # Llama 2
    (dict(norm_eps=1e-5, rope_theta=1e6), 32016, 16384),  # Code Llama
    (dict(norm_eps=1e-5, rope_theta=500000.0), 128256, 8192),  # Llama 3.0
    (dict(norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
     128256, 131072)])  # Llama 3.1, 3.2, 3.3
def test_original_context_of_released_models(params, vocab, context):
  got, why = meta.original_context(params, vocab)
  assert got == context and why
  assert meta.original_context(params, vocab, 12345) == (12345, "as given")


@pytest.mark.parametrize("dim,layers,factor", [
    (4096, 32, 8.0), (8192, 80, 8.0),  # Llama 3.1 8B, 3.3 70B
    (2048, 16, 32.0), (3072, 28, 32.0)])  # Llama 3.2 1B, 3B
def test_scaled_rope_factor(dim, layers, factor):
  # The factors of these models' Hugging Face config.json.
  params = dict(dim=dim, n_layers=layers, use_scaled_rope=True)
  scaling, _ = meta.rope_scaling(params)
  assert scaling.hf_dict() == {
      "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  assert meta.rope_scaling({**params, "use_scaled_rope": False})[0] is None


def test_tokenizer_vocab(tmp_path):
  (tmp_path / "sp.model").write_bytes(_sentencepiece(77))
  (tmp_path / "tk.model").write_bytes(_tiktoken(300))
  assert meta.tokenizer_vocab(tmp_path / "sp.model") == 77
  assert meta.tokenizer_vocab(tmp_path / "tk.model") == 300 + 256
  llama_models = pytest.importorskip("llama_models")
  shipped = os.path.join(os.path.dirname(llama_models.__file__), "llama3",
                         "tokenizer.model")
  assert meta.tokenizer_vocab(Path(shipped)) == 128256  # Llama 3's vocab


def test_config_and_note(reference, tmp_path):
  directory, _, _ = _cases(reference, tmp_path, "llama3_1_8b")
  checkpoint = Checkpoint.open(directory)
  c = checkpoint.config
  # int(1.3 * int(2 * 4 * 64 / 3)) = 221, rounded up to a multiple of 32.
  assert (c.intermediate_size, c.num_key_value_heads, c.head_dim) == (
      224, 2, 8)
  assert c.rope_scaling.hf_dict() == {
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  assert c.max_position_embeddings == 131072
  assert "original context 131072 tokens: Llama 3.1" in checkpoint.note
  given = Checkpoint.open(directory, original_context=65536)
  assert given.config.max_position_embeddings == 65536
  assert "65536 tokens: as given" in given.note
  # The evaluation commands' loading (--original-ctx) opens it the same way
  # (a Llama 2 with its tokenizer.model: 4096 unless given).
  llama2, _, _ = _cases(reference, tmp_path, "llama2_7b")
  assert load_model(llama2, "float32").config.max_position_embeddings == 4096
  loaded = load_model(llama2, "float32", original_context=2048, ctx=8192)
  assert (loaded.config.max_position_embeddings, loaded.config.rope_factor
          ) == (2048, 4.0)


def test_original_folder_and_hub_repo(reference, tmp_path, monkeypatch):
  # Llama 3.x Hub repos keep Meta's layout under original/; a repo with no
  # Hugging Face weights is fetched (here: found in the offline cache) as
  # Meta's files.
  from huggingface_hub import constants
  source, _, _ = _cases(reference, tmp_path, "llama2_7b")
  local = tmp_path / "local"
  shutil.copytree(source, local / "original")
  repo = tmp_path / "hub" / "models--acme--meta" / "snapshots" / "abc"
  shutil.copytree(source, repo / "original")
  (repo.parent.parent / "refs").mkdir()
  (repo.parent.parent / "refs" / "main").write_text("abc")
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  want = Checkpoint.open(source).params("float32")
  for name in (local, "hf:acme/meta"):
    checkpoint = Checkpoint.open(name)
    assert checkpoint.directory.name == "original"
    for a, b in zip(_leaves(checkpoint.params("float32")),
                    _leaves(want)):
      np.testing.assert_array_equal(a, b)


def _damage(reference, tmp_path, what):
  directory, _, _ = _cases(reference, tmp_path, "llama2_13b")
  params = json.loads((directory / "params.json").read_text())
  shard = lambda i: directory / f"consolidated.{i:02d}.pth"
  if what == "missing_shard":
    shard(1).rename(shard(2))
  elif what == "last_shard_gone":
    shard(1).unlink()
  elif what == "not_dividing":
    shutil.copy(shard(1), shard(2))
  elif what == "ffn_contradicts":
    (directory / "params.json").write_text(json.dumps(
        {**params, "multiple_of": 128}))
  elif what == "layers_contradict":
    (directory / "params.json").write_text(json.dumps(
        {**params, "n_layers": 3}))
  elif what == "vocab_contradicts":
    (directory / "tokenizer.model").write_bytes(_sentencepiece(100))
  elif what == "no_params":
    (directory / "params.json").unlink()
  elif what == "bad_json":
    (directory / "params.json").write_text("{not json")
  elif what == "extra_tensor":
    for i in range(2):
      state = torch.load(shard(i), weights_only=True)
      state["layers.0.attention.wq.lora_a"] = torch.zeros(2, 64)
      torch.save(state, shard(i))
  elif what == "malicious":
    torch.save({"x": _Payload()}, shard(0))
  elif what in ("tiled_kv", "split_kv_head"):
    llama3 = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2,
                  multiple_of=32, norm_eps=1e-5, vocab_size=128)
    model = _meta_model(reference, **llama3)
    shutil.rmtree(directory)
    states = (_reshard(reference, [model.state_dict()], 8, n_kv=2)
              if what == "tiled_kv" else  # fairscale's plain row split
              _split(model.state_dict(), 4, _LLAMA2_SPLIT))
    _save(directory, llama3, states)
  return directory


class _Payload:
  def __reduce__(self):
    return os.system, ("true",)


@pytest.mark.parametrize("what,message", [
    ("missing_shard", r"consolidated.01.pth: missing \(have 2 of 3 shards\)"),
    ("last_shard_gone", r"consolidated.00.pth: tok_embeddings.weight has "
     r"shape \(128, 32\), but params.json over 1 shard\(s\) implies "
     r"\(64, 64\).*download the missing"),
    ("not_dividing", r"3 shards do not divide n_heads=4"),
    ("ffn_contradicts", r"consolidated.00.pth: layers.0.feed_forward.w1.weight"
     r" has shape \(96, 64\), but params.json over 2 shard\(s\) implies "
     r"\(128, 64\); fix params.json"),
    ("layers_contradict", r"consolidated.00.pth: tensor "
     r"layers.2.attention.wq.weight is missing; params.json \(n_layers=3\)"),
    ("vocab_contradicts", r"tok_embeddings.weight has shape \(128, 32\), "
     r"but params.json over 2 shard\(s\) implies \(100, 32\)"),
    ("no_params", r"params.json: not found"),
    ("bad_json", r"params.json: not valid JSON"),
    ("extra_tensor", r"consolidated.00.pth: holds tensors a Llama text model "
     r"does not have \(layers.0.attention.wq.lora_a\)"),
    ("malicious", r"consolidated.00.pth: refuses to unpickle the global "
     r"\w+.system"),
    ("tiled_kv", r"consolidated.01.pth: layers.0.attention.wk.weight differs "
     r"from its replica in consolidated.00.pth"),
    ("split_kv_head", r"attention.wk.weight has shape \(4, 64\), but "
     r"params.json over 4 shard\(s\) implies \(8, 64\)"),
])
def test_bad_checkpoints(reference, tmp_path, what, message):
  directory = _damage(reference, tmp_path, what)
  with pytest.raises(CheckpointError, match=message) as e:
    Checkpoint.open(directory)
  assert "\n" not in str(e.value)


def test_llama3_release_exports_its_tokenizer(reference, tmp_path):
  # A Llama 3 release, its vocab told by its tokenizer.model (Meta's
  # tiktoken file): our tokenizer and the Hugging Face export's, loaded by
  # transformers with nothing beside it, encode as Meta's tokenizer, and
  # generation stops where Meta's does.
  import transformers
  from llama_models.llama3 import tokenizer as meta_tokenizer
  from longlora_jax import save_hf
  from tests.checkpoints.test_tokenizer import TEXTS
  model_file = Path(meta_tokenizer.__file__).parent / "tokenizer.model"
  theirs = meta_tokenizer.Tokenizer(model_file)
  params = dict(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, multiple_of=16,
                norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
  model = _meta_model(reference, theirs.n_words, **params)
  directory = _save(tmp_path / "llama3", {**params, "vocab_size": -1},
                    [model.state_dict()], model_file.read_bytes())
  checkpoint = Checkpoint.open(directory)
  assert checkpoint.config.vocab_size == theirs.n_words
  assert checkpoint.config.eos_token_id == tuple(theirs.stop_tokens)
  assert checkpoint.eos_id == theirs.eos_id
  out = save_hf(checkpoint.config, checkpoint.params("float32"),
                tmp_path / "hf", tokenizer_from=checkpoint.directory)
  exported = transformers.AutoTokenizer.from_pretrained(out)
  for text in TEXTS:
    want = theirs.encode(text, bos=True, eos=False, allowed_special="all")
    assert checkpoint.tokenizer(text)["input_ids"] == want, text
    assert exported(text)["input_ids"] == want, text
  generation = json.loads((out / "generation_config.json").read_text())
  assert (generation["bos_token_id"], generation["eos_token_id"]) == (
      theirs.bos_id, theirs.stop_tokens)
  assert not (out / "tokenizer.model").exists()  # tiktoken: nothing reads it
