"""Meta's release layout against Meta's own code: tiny models built with
llama_models' reference `Transformer` (its fairscale layers stood in for by
one-rank torch layers), saved as Meta saves them, one file or
tensor-parallel shards, and loaded by us."""

import importlib
import json
import shutil
import sys
import types
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from longlora_jax import CheckpointError, forward
from longlora_jax.checkpoints import meta, pth
from longlora_jax.checkpoints.checkpoint import Checkpoint, param_shardings
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
