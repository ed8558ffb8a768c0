import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longlora_jax import LlamaConfig, LongLoraError, forward, init_params
from longlora_jax.evaluation.perplexity import evaluate, window_starts
from longlora_jax.parallel.sharding import make_mesh, shardings_like

CFG = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4,
                  initializer_range=0.3)


def test_window_starts_official_and_sliding():
  # Official: range(0, 2000 - 512, 256) with the last start dropped.
  np.testing.assert_array_equal(window_starts(2000, 512, 256, "official"),
                                [0, 256, 512, 768, 1024])
  np.testing.assert_array_equal(window_starts(2000, 512, 256, "sliding"),
                                [0, 256, 512, 768, 1024, 1280])
  with pytest.raises(LongLoraError, match="too few for one official window"):
    window_starts(600, 512, 256)


def test_uniform_model_has_perplexity_vocab_size():
  params = init_params(CFG, jax.random.key(0))
  params["lm_head"]["kernel"] = jnp.zeros_like(params["lm_head"]["kernel"])
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, 1500)
  for mode in ("official", "sliding"):
    r = evaluate(CFG, params, tokens, 256, stride=128, mode=mode)
    np.testing.assert_allclose(r["perplexity"], CFG.vocab_size, rtol=1e-5)


def _log_probs(params, window):
  logits = np.asarray(forward(CFG, params, jnp.asarray(window[None])), np.float64)[0]
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  return logp[np.arange(len(window) - 1), window[1:]]


@pytest.mark.parametrize("mesh", [None, "fsdp=2,tensor=2"])
def test_official_protocol_against_float64_reference(mesh):
  params = init_params(CFG, jax.random.key(1))
  if mesh:  # weights in their shards; the figure must not change
    params = jax.device_put(params, shardings_like(params, make_mesh(
        mesh, jax.devices()[:4] if "tensor" in mesh else None)))
  tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, 1100)
  seq, stride = 200, 128
  want = [-_log_probs(params, tokens[s:s + seq]).mean()
          for s in list(range(0, 1100 - seq, stride))[:-1]]
  # Batches of 3 and of 4 over 7 windows: the last batch is padded.
  for batch in (3, 4):
    r = evaluate(CFG, params, tokens, seq, stride=stride, batch_size=batch)
    assert r["windows"] == len(want) == 7
    np.testing.assert_allclose(r["loss"], np.mean(want), rtol=1e-5)
    np.testing.assert_allclose(r["perplexity"], np.exp(np.mean(want)), rtol=1e-5)


def test_sliding_scores_each_token_once():
  params = init_params(CFG, jax.random.key(2))
  tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, 700)
  seq, stride = 300, 100
  r = evaluate(CFG, params, tokens, seq, stride=stride, mode="sliding",
               batch_size=2)
  # Windows at 0..400; tokens 1..699 each predicted once.
  assert r["windows"] == 5 and r["scored_tokens"] == 699
  nll = list(-_log_probs(params, tokens[:seq]))
  for s in range(stride, 401, stride):
    nll += list(-_log_probs(params, tokens[s:s + seq])[-stride:])
  np.testing.assert_allclose(r["loss"], np.mean(nll), rtol=1e-5)


def test_max_windows_spreads_evenly():
  params = init_params(CFG, jax.random.key(0))
  tokens = np.zeros(3000, np.int64)
  r = evaluate(CFG, params, tokens, 128, stride=64, max_windows=3)
  assert r["windows"] == 3


def test_auto_attention_is_cudnn_when_compiled_for_a_gpu():
  # eval.perplexity's default `--attention full`, compiled for a
  # compile-only H100: one cuDNN flash-attention call in the layer scan,
  # never the chunked loop (whose [block, block] score tiles would show).
  from longlora_jax.perf import gpu_target
  from longlora_jax.attention.chunked import DEFAULT_BLOCK, ONE_THREAD_BLOCK
  from longlora_jax.evaluation.perplexity import _window_losses
  if not gpu_target.AVAILABLE:
    pytest.skip("needs JAX's CUDA plugin (requirements-test.txt)")
  cfg = LlamaConfig(vocab_size=64, hidden_size=192, intermediate_size=160,
                    num_hidden_layers=2, num_attention_heads=2,
                    max_position_embeddings=2048)
  devices = gpu_target.devices("h100", 1)
  on = jax.sharding.SingleDeviceSharding(devices[0])
  params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=on),
      jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))))
  ids = jax.ShapeDtypeStruct((1, 2048), jnp.int32, sharding=on)
  first = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=on)
  with jax.set_mesh(make_mesh("fsdp=1", devices)), gpu_target.assume_cudnn():
    hlo = _window_losses.lower(cfg, "full", params, ids,
                               first).compile().as_text()
  calls = re.findall(r'custom_call_target="(__cudnn\$fmha[^"]*)"', hlo)
  assert calls == ["__cudnn$fmhaSoftmax"]
  tiles = {ONE_THREAD_BLOCK, DEFAULT_BLOCK}
  assert not [s for s in re.findall(r"\[([0-9,]+)\]", hlo)
              if sum(int(d) in tiles for d in s.split(",")) >= 2]
