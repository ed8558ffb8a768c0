import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from longlora_jax import (LlamaConfig, LongLoraError, forward, init_params,
                          preset)
from longlora_jax.model import lora
from longlora_jax.model.projection import project
from tests.references import hf_models
from tests.references.hf_models import peft, torch  # None without PyTorch

# GQA, so q/o and k/v adapters differ in shape; std 0.2 so logits are not
# near-uniform and a wrong model cannot pass a tolerance.
CONFIG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                     num_hidden_layers=3, num_attention_heads=8,
                     num_key_value_heads=2, initializer_range=0.2)
IDS = jnp.asarray(hf_models.random_ids(CONFIG.vocab_size, 2, 24))
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def _flat(tree):
  """'layers/self_attn/q_proj/kernel/a' -> leaf."""
  return {lora._path_name(path): x
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _bf16(params):
  return jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)


def _with_random_b(params, seed=1, std=0.3):
  """Non-zero b, different per layer, so the adapters change the model."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([
      std * jax.random.normal(k, x.shape, x.dtype)
      if lora._path_name(path).endswith("/b") else x
      for k, (path, x) in zip(keys, leaves)])


@pytest.fixture(scope="module")
def base():
  return init_params(CONFIG, jax.random.key(0))


def test_step0_identity_and_peft_init(base):
  hf_models.require("torch", "peft")
  params = lora.add_lora(base, rank=8, alpha=16, key=jax.random.key(1))
  np.testing.assert_array_equal(forward(CONFIG, params, IDS),
                                forward(CONFIG, base, IDS))
  q = params["layers"]["self_attn"]["q_proj"]["kernel"]
  k = params["layers"]["self_attn"]["k_proj"]["kernel"]
  # scale is static; w is the first leaf (flax checks its shape).
  assert q.scale == 2.0 and len(jax.tree.leaves(q)) == 3
  assert jax.tree.leaves(q)[0] is q.w
  assert q.a.shape == (3, 64, 8) and q.b.shape == (3, 8, 64)
  assert k.a.shape == (3, 64, 8) and k.b.shape == (3, 8, 16)
  np.testing.assert_array_equal(q.b, 0)
  assert q.w is base["layers"]["self_attn"]["q_proj"]["kernel"]
  # PEFT's lora_A init (torch kaiming_uniform_(a=sqrt(5)) on [r, in]) is
  # U(-1/sqrt(in), 1/sqrt(in)): check PEFT's, then ours, against that bound.
  torch.manual_seed(0)
  layer = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 64)),
                              peft.LoraConfig(r=8, target_modules=["0"]))
  peft_a = layer.base_model.model[0].lora_A["default"].weight.detach().numpy()
  bound = 1 / np.sqrt(64)
  for a in (peft_a, np.asarray(q.a)):
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert abs(a.std() - bound / np.sqrt(3)) < 0.1 * bound
  # Independent draws per layer and per target.
  assert not np.array_equal(q.a[0], q.a[1])
  assert not np.array_equal(q.a, k.a)


def test_lora_projection_against_numpy_float64():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 16)).astype(np.float32)
  w = rng.normal(size=(16, 12)).astype(np.float32)
  a = rng.normal(size=(16, 4)).astype(np.float32)
  b = rng.normal(size=(4, 12)).astype(np.float32)
  node = lora.LoRA(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), 2.5)
  x64, w64, a64, b64 = (v.astype(np.float64) for v in (x, w, a, b))
  want = x64 @ w64 + 2.5 * (x64 @ a64) @ b64
  got = project(jnp.asarray(x), node, jnp.float32)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  got16 = project(jnp.asarray(x), node, jnp.bfloat16)
  assert got16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got16, np.float64), want,
                             rtol=0.05, atol=0.5)
  np.testing.assert_allclose(lora.merge(node), w64 + 2.5 * a64 @ b64,
                             rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_merged_equals_unmerged_per_layer(base, remat):
  # nn.scan must hand layer i its own slice of w, a and b: compare with the
  # plain model whose kernels are merged per layer in NumPy float64.
  params = _with_random_b(lora.add_lora(base, rank=4, alpha=8,
                                        targets=ATTN + ("down_proj",),
                                        key=jax.random.key(2)))
  flat = traverse_util.flatten_dict(params)
  reference_flat = {}
  for path, x in flat.items():
    if lora.is_lora(x):
      a, b, w = (np.asarray(v, np.float64) for v in (x.a, x.b, x.w))
      x = jnp.asarray(w + 2.0 * np.einsum("ldr,lrf->ldf", a, b), jnp.float32)
    reference_flat[path] = x
  merged_np = traverse_util.unflatten_dict(reference_flat)
  got = forward(CONFIG, params, IDS, remat=remat)
  want = forward(CONFIG, merged_np, IDS)
  assert np.abs(want - forward(CONFIG, base, IDS)).max() > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  merged = lora.merge(params)
  assert not any(map(lora.is_lora, jax.tree.leaves(merged,
                                                   is_leaf=lora.is_lora)))
  np.testing.assert_allclose(forward(CONFIG, merged, IDS), want, rtol=1e-4,
                             atol=1e-4)


def test_merge_in_float32_then_cast(base):
  params = _with_random_b(lora.add_lora(_bf16(base), key=jax.random.key(3)))
  merged = lora.merge(params)["layers"]["self_attn"]["v_proj"]["kernel"]
  node = params["layers"]["self_attn"]["v_proj"]["kernel"]
  assert merged.dtype == jnp.bfloat16
  a, b, w = (np.asarray(v, np.float64) for v in (node.a, node.b, node.w))
  want = (w + node.scale * np.einsum("ldr,lrf->ldf", a, b)).astype(np.float32)
  np.testing.assert_array_equal(
      np.asarray(merged), np.asarray(jnp.asarray(want).astype(jnp.bfloat16)))


def test_one_adamw_step_trains_exactly_the_mask(base):
  params = _with_random_b(lora.add_lora(_bf16(base), key=jax.random.key(4)))
  mask = lora.trainable_mask(params)
  trainable, frozen = lora.split(params, mask)
  # The documented pattern: float32 master copies of the trainable leaves,
  # frozen leaves kept in bfloat16.
  trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)
  attn = [f"layers/self_attn/{p}/kernel/{ab}" for p in ATTN for ab in "ab"]
  want_trainable = {"embed_tokens/embedding", "layers/input_layernorm/weight",
                    "layers/post_attention_layernorm/weight", "norm/weight",
                    *attn}
  assert set(_flat(trainable)) == want_trainable
  assert set(_flat(frozen)) == set(_flat(params)) - want_trainable
  assert all(x.dtype == jnp.bfloat16 for x in _flat(frozen).values())

  optimizer = optax.adamw(1e-2)
  opt_state = optimizer.init(trainable)
  # Adam state (mu, nu) exists for the trainable leaves only.
  mu = opt_state[0].mu
  assert set(_flat(mu)) == want_trainable
  assert lora.count_params(opt_state) == 2 * lora.count_params(trainable) + 1

  def loss_fn(trainable):
    logits = forward(CONFIG, lora.combine(trainable, frozen), IDS,
                     dtype=jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1], IDS[:, 1:]).mean()

  grads = jax.grad(loss_fn)(trainable)
  assert set(_flat(grads)) == want_trainable
  updates, _ = optimizer.update(grads, opt_state, trainable)
  new = lora.combine(optax.apply_updates(trainable, updates), frozen)
  old_flat, new_flat = _flat(params), _flat(new)
  assert set(new_flat) == set(old_flat)
  for name, old in old_flat.items():
    if name in want_trainable:
      assert new_flat[name].dtype == jnp.float32
      assert not np.array_equal(np.asarray(new_flat[name], np.float32),
                                np.asarray(old, np.float32)), name
    else:
      assert new_flat[name].dtype == old.dtype
      np.testing.assert_array_equal(np.asarray(new_flat[name]),
                                    np.asarray(old), err_msg=name)


def test_masks_for_the_three_modes(base):
  params = lora.add_lora(base, rank=4, key=jax.random.key(5))
  L, D = 3, 64
  adapters = L * (2 * (D * 4 + 4 * 64) + 2 * (D * 4 + 4 * 16))
  count = lambda mask: lora.count_params(lora.split(params, mask)[0])
  assert count(lora.trainable_mask(params, extra=())) == adapters
  norms = (2 * L + 1) * D
  embed = 96 * D
  assert count(lora.trainable_mask(params)) == adapters + norms + embed
  assert count(lora.trainable_mask(params, extra=("norm",))) == adapters + norms
  assert count(lora.trainable_mask(params, extra=("embed", "norm", "lm_head"))
               ) == adapters + norms + 2 * embed
  full = lora.full_mask(base)
  assert lora.count_params(lora.split(base, full)[0]) == lora.count_params(base)
  assert lora.split(base, full)[1] == jax.tree.map(lambda _: None, base)


def test_llama2_7b_trainable_counts():
  config = preset("llama2-7b")
  shapes = jax.eval_shape(
      lambda key: lora.add_lora(init_params(config, key, jnp.bfloat16),
                                key=key),
      jax.random.key(0))
  count = lambda extra: lora.count_params(
      lora.split(shapes, lora.trainable_mask(shapes, extra))[0])
  assert count(()) == 8_388_608
  assert count(("norm",)) - count(()) == 266_240
  assert count(("embed",)) - count(()) == 32000 * 4096
  assert count(lora.LORA_PLUS) == 8_388_608 + 266_240 + 32000 * 4096
  assert lora.count_params(lora.strip(shapes)) == 6_738_415_616


def test_bad_arguments(base):
  with pytest.raises(LongLoraError, match="unknown LoRA targets.*qkv_proj"):
    lora.add_lora(base, targets=("q_proj", "qkv_proj"), key=jax.random.key(0))
  with pytest.raises(LongLoraError, match="rank"):
    lora.add_lora(base, rank=0, key=jax.random.key(0))
  params = lora.add_lora(base, key=jax.random.key(0))
  with pytest.raises(LongLoraError, match="already hold LoRA"):
    lora.add_lora(params, key=jax.random.key(0))
  with pytest.raises(LongLoraError, match="embeds.*match no parameter"):
    lora.trainable_mask(params, extra=("embeds",))
  with pytest.raises(LongLoraError, match="tuple"):
    lora.trainable_mask(params, extra="norm")
  with pytest.raises(LongLoraError, match="nothing would train"):
    lora.trainable_mask(base, extra=())


@pytest.mark.parametrize("name", ["olmo2", "phi3", "gemma2", "gemma3_text"])
def test_lora_plus_trains_every_norm_each_family_has(tiny_hf, name):
  # Every norm transformers' model of the family has (OLMo 2: post-norms
  # and q/k norms over the projections) trains under LoRA+, nothing else
  # but the embedding and the adapters (Phi-3: on the fused qkv_proj).
  directory, hf_model = tiny_hf(name)
  from longlora_jax import load_hf
  config, params = load_hf(directory, dtype=jnp.float32)
  mask = _flat(lora.trainable_mask(lora.add_lora(params, key=jax.random.key(0))))
  trained = {p.removesuffix("/weight") for p, m in mask.items()
             if m and "norm" in p}
  per_layer = {n.split(".", 3)[-1].removesuffix(".weight")
               for n, _ in hf_model.named_parameters() if "norm" in n
               and ".layers.0." in n}
  assert trained == {f"layers/{n.replace('.', '/')}" for n in per_layer} | {
      "norm"}
  attention = ("qkv_proj", "o_proj") if name == "phi3" else ATTN
  assert {p for p, m in mask.items() if m and "norm" not in p} == {
      "embed_tokens/embedding", *(f"layers/self_attn/{t}/kernel/{ab}"
                                  for t in attention for ab in "ab")}
