import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax import LlamaConfig, forward, init_params
from longlora_jax.perf import gpu_target
from longlora_jax.model.config import RopeScaling
from longlora_jax.model.generation import _extend, generate
from longlora_jax.checkpoints.checkpoint import Checkpoint, param_shardings
from longlora_jax.parallel.sharding import make_mesh
from tests.references import hf_models
from tests.references.hf_models import torch  # None without PyTorch


def _recompute_greedy(config, params, ids, n):
  """Greedy decoding that reruns the whole sequence for every token. The
  sequence is padded on the right to its final length: causal attention
  never looks ahead, so one compiled forward serves every step."""
  f = jax.jit(functools.partial(forward, config))
  B, T = ids.shape
  seq = np.zeros((B, T + n), np.int32)
  seq[:, :T] = ids
  for i in range(n):
    logits = f(params, jnp.asarray(seq))
    seq[:, T + i] = np.asarray(jnp.argmax(logits[:, T + i - 1], -1))
  return seq[:, T:]


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


@pytest.mark.parametrize("mesh", [None, "fsdp=4,tensor=2"])
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


# The families beyond Llama's layout, and sliding windows (qwen2_yarn: a
# global and a local layer of 16 tokens) under prompts longer than them.
NEW_FAMILIES = ("olmo2", "phi3", "gemma2", "gemma3_text", "qwen2_yarn")


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_families_greedy_match_transformers_generate(tiny_hf, name):
  directory, hf_model = tiny_hf(name)
  checkpoint = Checkpoint.open(directory)
  config = checkpoint.config
  ids = hf_models.random_ids(config.vocab_size, 1, 20, seed=5)
  # (An explicit mask: generate would otherwise hide the prompt's pad ids.)
  want = hf_model.generate(torch.tensor(ids), max_new_tokens=8,
                           attention_mask=torch.ones(ids.shape, dtype=int),
                           do_sample=False, eos_token_id=None,
                           pad_token_id=0)[:, 20:].numpy()
  got = generate(config, checkpoint.params("float32"), ids, max_new_tokens=8,
                 eos_token_id=None, chunk_size=8)
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


@pytest.mark.skipif(not gpu_target.AVAILABLE,
                    reason="needs JAX's CUDA plugin (requirements-test.txt)")
@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cache_is_updated_in_place_when_compiled_for_gpu(decode, kv_heads):
  # XLA:GPU for a compile-only H100: neither a prefill step nor a decode
  # step (one query per kv head without GQA) may re-lay out the cache,
  # which would take a copy of all of it as a temporary at every step.
  from longlora_jax.model.generation import lower_extend
  from longlora_jax.parallel.sharding import make_mesh
  cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=kv_heads,
                    max_position_embeddings=262144)
  mesh = make_mesh("fsdp=1", gpu_target.devices("h100", 1))
  memory = lower_extend(cfg, mesh, ctx=262144, chunk=512,
                        decode=decode).compile().memory_analysis()
  one_cache = 2 * kv_heads * 262144 * 32 * 2  # keys or values, bf16
  assert memory.alias_size_in_bytes == 2 * one_cache  # donated, in place
  assert memory.temp_size_in_bytes < one_cache / 4


@pytest.mark.skipif(not gpu_target.AVAILABLE,
                    reason="needs JAX's CUDA plugin (requirements-test.txt)")
def test_prefill_over_the_cache_is_one_kernel_per_layer_on_a_gpu():
  # Compiled for a compile-only H100, a prefill chunk's attention over the
  # cache is the fused Pallas kernel (one launch inside the layer scan),
  # never the XLA loop over cache blocks; a decode step keeps that loop.
  from longlora_jax.model.generation import lower_extend
  from longlora_jax.parallel.sharding import make_mesh
  cfg = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=8192)
  mesh = make_mesh("fsdp=1", gpu_target.devices("h100", 1))
  hlo = lambda decode: lower_extend(cfg, mesh, ctx=8192, chunk=512,
                                    decode=decode).compile().as_text()
  prefill, decode = hlo(False), hlo(True)
  kernels = re.findall(r'custom_call_target="__gpu\$xla\.gpu\.triton"',
                       prefill)
  assert len(kernels) == 1 and "cached_attention" in prefill
  # One while loop, the layer scan; the XLA attention adds one per layer.
  assert len(re.findall(r" while\(", prefill)) == 1
  assert "__gpu$xla.gpu.triton" not in decode
  assert len(re.findall(r" while\(", decode)) == 2
