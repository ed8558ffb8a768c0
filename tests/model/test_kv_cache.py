import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax import LlamaConfig, load_hf
from longlora_jax.model.kv_cache import CACHE_BLOCK, init_cache
from longlora_jax.model.llama import extend_cache, lm_head
from tests.references import hf_models


def test_init_cache_shape_rounds_up():
  cfg = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=8,
                    num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2)
  cache = init_cache(cfg, batch=2, length=CACHE_BLOCK + 1)
  assert cache["k"].shape == (3, 2, 2, 4, 2 * CACHE_BLOCK)  # [L, B, K, H, S]
  assert cache["v"].shape == (3, 2, 2, 2 * CACHE_BLOCK, 4)  # [L, B, K, S, H]
  assert cache["v"].dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["gqa", "pi4"])
def test_chunks_over_cache_equal_transformers(tiny_hf, name):
  directory, hf_model = tiny_hf(name)
  config, params = load_hf(directory, dtype="float32")
  ids = hf_models.random_ids(config.vocab_size, 2, 90, seed=3)
  cache = init_cache(config, 2, 120, jnp.float32)
  pieces = []
  for lo, hi in [(0, 40), (40, 41), (41, 90)]:
    h, cache = extend_cache(config, params, jnp.asarray(ids[:, lo:hi]), cache, lo)
    pieces.append(lm_head(config, params, h))
  np.testing.assert_allclose(np.concatenate(pieces, axis=1),
                             hf_models.hf_logits(hf_model, ids), atol=1e-4)


def test_decode_step_never_copies_a_layers_cache():
  # A decode step's work must follow the tokens attended, not the cache's
  # allocated length: no instruction of the compiled step may produce a
  # whole layer of the cache (the stacked cache itself is updated in place).
  from longlora_jax import init_params
  from longlora_jax.model.generation import _extend
  cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                    num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=8192)
  params = init_params(cfg, jax.random.key(0))
  cache = init_cache(cfg, 1, 4096, jnp.float32)
  hlo = _extend.lower(cfg, params, cache, jnp.zeros((1, 1), jnp.int32), 100,
                      0).compile().as_text()
  layer = re.compile(r"= f32\[(1,)?(2,16,4096|2,4096,16)\]")
  assert "f32[3,1,2,16,4096]" in hlo  # the stacked cache is there
  assert not [line for line in hlo.splitlines() if layer.search(line)]
