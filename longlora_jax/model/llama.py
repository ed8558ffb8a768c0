"""Llama-2 decoder in Flax linen, used functionally.

Array names end in their axes, one letter each, the same everywhere in the
project (`x_BTD` is [batch, seq, hidden]):

  B batch            T query length      S key length
  N query heads      K kv heads          Q query heads per kv head (N / K)
  H head dim         D model dim         F MLP dim (or any output features)
  V vocab            L layers            R LoRA rank
  G S² group size    C chunk length      P context slices (devices)
  W halo tokens (keys a context slice receives from the slices before it)

A lowercase letter is a part or a count of the axis it follows from: `n`
half of the heads, `h` half of the head dim, `g` groups folded into rows,
`t`/`s` a block of queries/keys, `c` a number of chunks.

`params` is a plain nested dict whose names mirror the HF module tree:

  embed_tokens/embedding           [vocab, hidden]
  layers/input_layernorm/weight    [layers, hidden]
  layers/self_attn/{q,k,v,o}_proj/kernel   [layers, in, out]
  layers/post_attention_layernorm/weight   [layers, hidden]
  layers/mlp/{gate,up,down}_proj/kernel    [layers, in, out]
  norm/weight                      [hidden]
  lm_head/kernel                   [hidden, vocab]   (absent when tied)

The layers are one `nn.scan` (stacked on a leading axis) so compile time does
not grow with depth. Kernels are `[in, out]`, the transpose of torch's.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from longlora_jax.attention.by_group import S2ByGroup
from longlora_jax.attention.dispatch import (AttentionFn, cached_attention,
                                             get_attention, layer_attention)
from longlora_jax.attention.masks import soft_cap
from longlora_jax.model import by_group
from longlora_jax.model.config import LlamaConfig
from longlora_jax.model.modules import Dense, family_norm
from longlora_jax.model.remat import (LAYER_INPUT, REMAT_POLICIES,
                                      remat_blocks, split_layers)
from longlora_jax.model.rope import apply_rope, rope_frequencies
from longlora_jax.parallel.sharding import (context_slices, gather_over_context,
                                   shard_batch)

DType = Any

# Above this many tokens the MLP runs in sequence chunks (see DecoderLayer).
MLP_CHUNK = 4096


class LayerPart(nn.Module):
  """What a layer and its attention are made with: the config, the
  attention function, the compute and the parameters' dtypes."""
  config: LlamaConfig
  attention_fn: AttentionFn
  dtype: DType
  param_dtype: DType


class Attention(LayerPart):

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache, layer,
               piece=None):
    cfg = self.config
    B, T, D = x_BTD.shape
    N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dense = lambda features, name, bias: Dense(
        features, self.dtype, self.param_dtype, cfg.initializer_range, bias,
        name=name)
    if cfg.fused:  # Phi-3: one projection, q then k then v
      q_BTF, k_BTF, v_BTF = jnp.split(
          dense((N + 2 * K) * H, "qkv_proj", cfg.qkv_bias)(x_BTD),
          [N * H, (N + K) * H], axis=-1)
    else:
      q_BTF = dense(N * H, "q_proj", cfg.qkv_bias)(x_BTD)
      k_BTF = dense(K * H, "k_proj", cfg.qkv_bias)(x_BTD)
      v_BTF = dense(K * H, "v_proj", cfg.qkv_bias)(x_BTD)
    v_BTKH = v_BTF.reshape(B, T, K, H)
    norm = lambda name: family_norm(cfg, self.param_dtype, name)
    if cfg.qk_norm and cfg.qk_norm_over == "projection":
      # OLMo 2: one RMSNorm over all heads' dims, before the split.
      q_BTF, k_BTF = norm("q_norm")(q_BTF), norm("k_norm")(k_BTF)
    q_BTNH, k_BTKH = q_BTF.reshape(B, T, N, H), k_BTF.reshape(B, T, K, H)
    if cfg.qk_norm and cfg.qk_norm_over == "head":
      # Qwen3: RMSNorm over each head's dims, before RoPE.
      q_BTNH, k_BTKH = norm("q_norm")(q_BTNH), norm("k_norm")(k_BTKH)
    if cfg.query_pre_attn_scalar:
      # Gemma scales scores by query_pre_attn_scalar ** -0.5; attention
      # applies head_dim ** -0.5, so q carries the ratio.
      q_BTNH = q_BTNH * jnp.asarray(
          (H / cfg.query_pre_attn_scalar) ** 0.5, q_BTNH.dtype)
    inv_freq_h, scale = rope_frequencies(cfg, positions_BT)
    if cfg.local_rope_theta is not None:  # Gemma 3: local layers' own base
      local_h, _ = rope_frequencies(dataclasses.replace(
          cfg, rope_theta=cfg.local_rope_theta, rope_scaling=None),
          positions_BT)
      local = jnp.asarray(cfg.local_layers)[layer]
      inv_freq_h = jnp.where(local, local_h, inv_freq_h)
      scale = jnp.where(local, 1.0, scale)
    q_BTNH = shard_batch(apply_rope(q_BTNH, positions_BT, inv_freq_h, scale))
    k_BTKH = shard_batch(apply_rope(k_BTKH, positions_BT, inv_freq_h, scale))
    v_BTKH = shard_batch(v_BTKH)
    if piece is not None:  # (index, count): S²-Attn by group (`by_group`)
      out_BTNH = self.attention_fn(q_BTNH, k_BTKH, v_BTKH, piece=piece[0],
                                   pieces=piece[1],
                                   segment_ids_BT=segment_ids_BT)
    elif cache is None:
      out_BTNH = layer_attention(self.attention_fn, cfg.sliding_window,
                                 cfg.local_layers,
                                 cfg.attn_logit_softcapping)(
          q_BTNH, k_BTKH, v_BTKH, segment_ids_BT=segment_ids_BT, layer=layer)
    else:
      # Generation: every row's chunk starts at the same cache position.
      start = positions_BT[0, 0]
      # Keys [L, B, K, H, S], values [L, B, K, S, H] (see kv_cache).
      write = lambda cache_L, new, at: jax.lax.dynamic_update_slice(
          cache_L, new[None].astype(cache_L.dtype), at)
      cache = {"k": write(cache["k"], k_BTKH.transpose(0, 2, 3, 1),
                          (layer, 0, 0, 0, start)),
               "v": write(cache["v"], v_BTKH.transpose(0, 2, 1, 3),
                          (layer, 0, 0, start, 0))}
      window = None
      if any(cfg.local_layers):  # a huge window on global layers
        window = jnp.where(jnp.asarray(cfg.local_layers)[layer],
                           cfg.sliding_window, jnp.iinfo(jnp.int32).max)
      out_BTNH = cached_attention(q_BTNH, cache["k"], cache["v"], layer,
                                  start, window=window,
                                  softcap=cfg.attn_logit_softcapping)
    out_BTNH = shard_batch(out_BTNH)
    out_BTD = dense(D, "o_proj", cfg.o_bias)(out_BTNH.reshape(B, T, N * H))
    return out_BTD, cache


class MLP(nn.Module):
  config: LlamaConfig
  dtype: DType
  param_dtype: DType

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.config
    dense = lambda features, name: Dense(
        features, self.dtype, self.param_dtype, cfg.initializer_range,
        name=name)
    if cfg.fused:  # Phi-3: gate then up, one projection
      gate_BTF, up_BTF = jnp.split(
          dense(2 * cfg.intermediate_size, "gate_up_proj")(x_BTD), 2, axis=-1)
    else:
      gate_BTF = dense(cfg.intermediate_size, "gate_proj")(x_BTD)
      up_BTF = dense(cfg.intermediate_size, "up_proj")(x_BTD)
    act = (lambda x: nn.gelu(x, approximate=True)) if cfg.gemma else nn.silu
    return dense(cfg.hidden_size, "down_proj")(act(gate_BTF) * up_BTF)


class AttentionBlock(LayerPart):
  """The input norm and the attention: what S²-Attn by group runs piece by
  piece (`by_group`); in the layer's scope, so the parameters keep their
  names."""

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache, layer,
               piece=None):
    cfg = self.config
    # "pre" normalises what enters a block, "post" what leaves it.
    if cfg.norm_placement in ("pre", "both"):
      x_BTD = family_norm(cfg, self.param_dtype, "input_layernorm")(x_BTD)
    return Attention(cfg, self.attention_fn, self.dtype, self.param_dtype,
                     name="self_attn")(x_BTD, positions_BT, segment_ids_BT,
                                       cache, layer, piece)


class DecoderLayer(LayerPart):

  @nn.compact
  def __call__(self, carry, positions_BT, segment_ids_BT, layer):
    # The KV cache rides in the scan carry, so XLA updates it in place.
    x_BTD, cache = carry
    # Everything below reads the named copy, so under the "offload" policy
    # the backward pass needs only the offloaded one, not the input itself.
    x_BTD = checkpoint_name(shard_batch(x_BTD), LAYER_INPUT)
    cfg = self.config
    norm = lambda name: family_norm(cfg, self.param_dtype, name)
    pre, post = (cfg.norm_placement in ("pre", "both"),
                 cfg.norm_placement in ("post", "both"))
    block = AttentionBlock(cfg, self.attention_fn, self.dtype,
                           self.param_dtype)
    nn.share_scope(self, block)
    if isinstance(self.attention_fn, S2ByGroup):  # training only: no cache
      x_BTD = by_group.attention_by_group(
          block, cfg, self.attention_fn, x_BTD, positions_BT, segment_ids_BT,
          layer)
    else:
      attn_BTD, cache = block(x_BTD, positions_BT, segment_ids_BT, cache,
                              layer)
      if post:
        attn_BTD = norm("post_attention_layernorm")(attn_BTD)
      x_BTD = x_BTD + attn_BTD
    h_BTD = x_BTD if not pre else norm(
        "pre_feedforward_layernorm" if post else "post_attention_layernorm")(
            x_BTD)
    out_norm = norm("post_feedforward_layernorm") if post else lambda y: y
    mlp = MLP(cfg, self.dtype, self.param_dtype, name="mlp")
    B, T, D = h_BTD.shape
    P = context_slices()
    chunk = mlp_chunk(T // P)
    if chunk == T:
      x_BTD = x_BTD + out_norm(mlp(h_BTD))
    else:
      # Long sequences: the MLP runs over sequence chunks, each recomputed in
      # the backward pass, so its [seq, intermediate] activations (several
      # GB at 100k tokens) exist one chunk at a time.
      # Under a context axis each device scans its own slice's chunks (the
      # P axis stays split); a scan over the split axis would gather it.
      step = nn.remat(lambda m, c, x: (c, m(shard_batch(x))),
                      prevent_cse=False)
      scan = nn.scan(step, variable_broadcast="params",
                     split_rngs={"params": False}, in_axes=2, out_axes=2)
      _, out_BPcCD = scan(mlp, None, h_BTD.reshape(B, P, T // P // chunk,
                                                   chunk, D))
      x_BTD = x_BTD + out_norm(out_BPcCD.reshape(B, T, D))
    return (shard_batch(x_BTD), cache), None


def mlp_chunk(seq: int, target: int = MLP_CHUNK) -> int:
  """Tokens per MLP chunk: the largest divisor of `seq` in (target/2,
  target], or the whole sequence when it is short or has no such divisor."""
  if seq <= target:
    return seq
  return next((c for c in range(target, target // 2, -1) if seq % c == 0), seq)


def _embed_init(std: float, pad_token_id: int | None):
  """Normal(0, std) with the padding row zeroed, as transformers does."""
  def init(key, shape, dtype):
    table = nn.initializers.normal(std)(key, shape, dtype)
    if pad_token_id is not None and 0 <= pad_token_id < shape[0]:
      table = table.at[pad_token_id].set(0)
    return table
  return init


class Decoder(nn.Module):
  """Token ids to final normed hidden states (everything but the lm_head)."""
  config: LlamaConfig
  attention_fn: AttentionFn
  dtype: DType
  param_dtype: DType
  remat: str = "none"

  @nn.compact
  def __call__(self, input_ids_BT, positions_BT, segment_ids_BT, cache=None):
    cfg = self.config
    x_BTD = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
        param_dtype=self.param_dtype,
        embedding_init=_embed_init(cfg.initializer_range, cfg.pad_token_id),
        name="embed_tokens")(input_ids_BT)
    if cfg.gemma:  # sqrt(hidden) rounded to the compute dtype, as Gemma's
      x_BTD = x_BTD * jnp.asarray(cfg.hidden_size ** 0.5, x_BTD.dtype)
    layer = nn.map_variables(DecoderLayer, "params",
                             trans_in_fn=gather_over_context, init=True)
    policy = REMAT_POLICIES[self.remat]
    if policy is not None:
      layer = nn.remat(layer, policy=policy, prevent_cse=False)
    scan = lambda module, length: nn.scan(
        module, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, 0), length=length)
    L = cfg.num_hidden_layers
    blocks = remat_blocks(L, self.remat)
    layer_index = jnp.arange(L)
    if blocks > 1:  # the params come as [blocks, L / blocks, ...]: split_layers
      layer = nn.remat(scan(layer, L // blocks), policy=policy,
                       prevent_cse=False)
      layer_index = layer_index.reshape(blocks, L // blocks)
    layers = scan(layer, len(layer_index))
    (x_BTD, cache), _ = layers(
        cfg, self.attention_fn, self.dtype, self.param_dtype, name="layers")(
            (x_BTD, cache), positions_BT, segment_ids_BT, layer_index)
    return family_norm(cfg, self.param_dtype, "norm")(x_BTD), cache


def init_params(config: LlamaConfig, key: jax.Array, dtype: DType = jnp.float32):
  """Random parameters, initialised as transformers initialises Llama.

  Linear and embedding weights ~ Normal(0, initializer_range), norms 1, the
  padding embedding row 0. Use `jax.eval_shape(init_params, ...)` for shapes
  without allocating.
  """
  body_key, head_key = jax.random.split(key)
  decoder = Decoder(config, get_attention("full"), dtype, dtype)
  params = dict(decoder.init(body_key, jnp.zeros((1, 1), jnp.int32),
                             jnp.zeros((1, 1), jnp.int32), None)["params"])
  if not config.tie_word_embeddings:
    kernel_DV = nn.initializers.normal(config.initializer_range)(
        head_key, (config.hidden_size, config.vocab_size), dtype)
    params["lm_head"] = {"kernel": kernel_DV}
  return params


def hidden_states(config: LlamaConfig, params, input_ids_BT, *,
                  attention: str | AttentionFn = "full", positions_BT=None,
                  segment_ids_BT=None, dtype: DType | None = None,
                  remat: str = "none"):
  """Final normed hidden states `[batch, seq, hidden]` in the compute dtype.

  Args:
    attention: a name from `longlora_jax.attention.ATTENTION_FNS`, an
      `AttentionSpec`, or a function with the attention signature.
    positions_BT: RoPE positions; default 0..seq-1 for every row.
    segment_ids_BT: packed-document ids; tokens attend only within their own
      segment (when the attention function supports it).
    dtype: compute dtype; default the parameters' dtype.
    remat: per-layer rematerialisation, one of `REMAT_POLICIES`.
  """
  B, T = input_ids_BT.shape
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  h_BTD, _ = _apply(config, params, input_ids_BT, positions_BT, segment_ids_BT,
                    None, attention=attention, dtype=dtype, remat=remat)
  return h_BTD


def extend_cache(config: LlamaConfig, params, input_ids_BT, cache, start, *,
                 dtype: DType | None = None):
  """Runs tokens at positions start..start+seq-1 over a KV cache.

  Their keys and values are written into `cache` (see `kv_cache.init_cache`)
  and they attend, causally and with full attention, to everything cached
  before them. Returns (hidden states `[batch, seq, hidden]`, new cache).
  """
  B, T = input_ids_BT.shape
  positions_BT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
  return _apply(config, params, input_ids_BT, positions_BT, None, cache,
                attention="full", dtype=dtype, remat="none")


def _apply(config, params, input_ids_BT, positions_BT, segment_ids_BT, cache, *,
           attention, dtype, remat):
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}; choose one of "
                     f"{sorted(REMAT_POLICIES)}")
  embedding = params["embed_tokens"]["embedding"]
  decoder = Decoder(config, get_attention(attention), dtype or embedding.dtype,
                    embedding.dtype, remat)
  body = {k: v for k, v in params.items() if k != "lm_head"}
  body["layers"] = split_layers(body["layers"], config.num_hidden_layers,
                                remat)
  return decoder.apply({"params": body}, input_ids_BT, positions_BT,
                       segment_ids_BT, cache)


def lm_head_params(config: LlamaConfig, params) -> dict:
  """The part of `params` that `lm_head` reads: the embedding when tied."""
  name = "embed_tokens" if config.tie_word_embeddings else "lm_head"
  return {name: params[name]}


def lm_head(config: LlamaConfig, params, h_BTD):
  """Float32 logits `[batch, seq, vocab]` from hidden states (soft-capped,
  cap * tanh(logits / cap), where the config says: Gemma 2)."""
  if config.tie_word_embeddings:
    logits_BTV = jnp.einsum(
        "BTD,VD->BTV", h_BTD,
        params["embed_tokens"]["embedding"].astype(h_BTD.dtype),
        preferred_element_type=jnp.float32)
  else:
    logits_BTV = jnp.einsum("BTD,DV->BTV", h_BTD,
                            params["lm_head"]["kernel"].astype(h_BTD.dtype),
                            preferred_element_type=jnp.float32)
  return soft_cap(logits_BTV, config.final_logit_softcapping)


def forward(config: LlamaConfig, params, input_ids_BT, **kwargs):
  """Float32 logits `[batch, seq, vocab]`; kwargs as `hidden_states`."""
  return lm_head(config, params, hidden_states(config, params, input_ids_BT,
                                               **kwargs))
