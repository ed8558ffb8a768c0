import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax import LlamaConfig, forward, init_params
from longlora_jax.config import RopeScaling
from longlora_jax.generate import _extend, generate
from longlora_jax.io.checkpoint import Checkpoint, param_shardings
from longlora_jax.sharding import make_mesh
from tests.references import hf_models
from tests.references.hf_models import torch  # None without PyTorch


def _recompute_greedy(config, params, ids, n):
  """Greedy decoding that reruns the whole sequence for every token."""
  f = jax.jit(functools.partial(forward, config))
  seq, out = np.asarray(ids), []
  for _ in range(n):
    nxt = np.asarray(jnp.argmax(f(params, jnp.asarray(seq))[:, -1], -1))
    out.append(nxt)
    seq = np.concatenate([seq, nxt[:, None]], axis=1)
  return np.stack(out, axis=1)


@pytest.mark.parametrize("kv_heads,factor", [(4, 1.0), (2, 4.0), (1, 2.0)])
def test_cached_greedy_equals_recompute(kv_heads, factor):
  cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=kv_heads, initializer_range=0.3,
                    rope_scaling=RopeScaling(factor) if factor > 1 else None,
                    eos_token_id=None)
  params = init_params(cfg, jax.random.key(kv_heads))
  ids = hf_models.random_ids(cfg.vocab_size, 2, 150, seed=kv_heads)
  # Prompt of 150 in chunks of 64: three prefill steps, the last padded.
  got = generate(cfg, params, ids, max_new_tokens=12, chunk_size=64)
  np.testing.assert_array_equal(got, _recompute_greedy(cfg, params, ids, 12))


@pytest.mark.parametrize("mesh", [None, "fsdp=8", "fsdp=4,tensor=2"])
def test_greedy_matches_transformers_generate(tiny_hf, mesh):
  # On a mesh the weights and the KV cache are sharded (the cache over kv
  # heads on the tensor axis); the tokens must not change.
  directory, hf_model = tiny_hf("gqa")
  checkpoint = Checkpoint.open(directory)
  config = checkpoint.config
  params = checkpoint.params("float32", mesh and param_shardings(
      config, make_mesh(mesh)))
  ids = hf_models.random_ids(config.vocab_size, 1, 30, seed=4)
  want = hf_model.generate(torch.tensor(ids), max_new_tokens=8, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[:, 30:].numpy()
  got = generate(config, params, ids, max_new_tokens=8, eos_token_id=None)
  np.testing.assert_array_equal(got, want)


def test_no_recompilation_per_token():
  cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=32,
                    num_hidden_layers=1, num_attention_heads=2,
                    eos_token_id=None)
  params = init_params(cfg, jax.random.key(0))
  ids = np.ones((1, 10), np.int32)
  generate(cfg, params, ids, max_new_tokens=3)
  before = _extend._cache_size()
  generate(cfg, params, ids, max_new_tokens=40)
  assert _extend._cache_size() == before


def test_stops_on_eos_and_streams():
  cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=32,
                    num_hidden_layers=1, num_attention_heads=2,
                    initializer_range=0.5)
  params = init_params(cfg, jax.random.key(0))
  ids = np.full((1, 5), 7, np.int32)
  free = generate(cfg, params, ids, max_new_tokens=6, eos_token_id=None)
  stop_at = int(free[0, 2])
  streamed = []
  out = generate(cfg, params, ids, max_new_tokens=6, eos_token_id=stop_at,
                 on_token=streamed.append)
  first = list(free[0]).index(stop_at)
  np.testing.assert_array_equal(out[0], free[0, :first + 1])
  assert [int(t[0]) for t in streamed] == list(out[0])


def test_sampling_is_seeded_and_top_p_tiny_is_greedy():
  cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=32,
                    num_hidden_layers=1, num_attention_heads=2,
                    eos_token_id=None, initializer_range=0.5)
  params = init_params(cfg, jax.random.key(1))
  ids = np.full((2, 4), 3, np.int32)
  run = lambda seed, **kw: generate(cfg, params, ids, max_new_tokens=10,
                                    key=jax.random.key(seed), **kw)
  np.testing.assert_array_equal(run(0, temperature=1.0), run(0, temperature=1.0))
  assert not np.array_equal(run(0, temperature=1.0), run(1, temperature=1.0))
  # top_p -> 0 keeps only the most likely token: greedy.
  np.testing.assert_array_equal(run(5, temperature=1.0, top_p=1e-6), run(0))
