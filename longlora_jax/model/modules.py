"""The Flax modules a decoder layer is built of: `Dense` (over a kernel of
any kind the parameter tree holds) and `RMSNorm` (each family's)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from longlora_jax.model.config import LlamaConfig
from longlora_jax.model.lora import is_nf4_kernel
from longlora_jax.model.projection import project

DType = Any


def rms_norm(x_BTD, weight_D, eps: float, weight_f32: bool = False,
             offset: bool = False):
  """HF LlamaRMSNorm: statistics in float32, result in x's dtype; the weight
  applied in x's dtype, or before the cast back with `weight_f32` (OLMo 2),
  as (1 + weight) with `offset` (Gemma)."""
  x32 = x_BTD.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  if offset:
    return (normed * _per_feature(1.0 + weight_D.astype(jnp.float32), x_BTD)
            ).astype(x_BTD.dtype)
  if weight_f32:
    return (_per_feature(weight_D.astype(jnp.float32), x_BTD) * normed
            ).astype(x_BTD.dtype)
  return _per_feature(weight_D.astype(x_BTD.dtype), x_BTD) * normed.astype(
      x_BTD.dtype)


def _per_feature(v_D, x_BTD):
  """`v_D` broadcast over `x_BTD`'s batch and tokens in one step, so that
  the gradient of a product with it is one reduction over both. (NumPy-style
  broadcasting first makes v `[1, 1, D]`; at batch 1 the product's gradient
  then reduces over the tokens alone, a reduction XLA:CPU in jax 0.10 runs
  about 10x slower: 5% of a LoRA+ train step, whose norms are trained.)"""
  return jax.lax.broadcast_in_dim(v_D, x_BTD.shape, (x_BTD.ndim - 1,))


class Dense(nn.Module):
  features: int
  dtype: DType
  param_dtype: DType
  std: float
  use_bias: bool = False

  @nn.compact
  def __call__(self, x_BTD):
    kernel_DF = self.get_variable("params", "kernel")
    # A 4-bit kernel is read as it is: flax would check its first leaf, the
    # packed codes, against the kernel's shape (checked where it is loaded).
    if not is_nf4_kernel(kernel_DF):
      kernel_DF = self.param("kernel", nn.initializers.normal(self.std),
                             (x_BTD.shape[-1], self.features),
                             self.param_dtype)
    y_BTF = project(x_BTD, kernel_DF, self.dtype)
    if self.use_bias:  # zeros at init, as transformers initialises them
      y_BTF += self.param("bias", nn.initializers.zeros, (self.features,),
                          self.param_dtype).astype(self.dtype)
    return y_BTF


class RMSNorm(nn.Module):
  eps: float
  param_dtype: DType
  weight_f32: bool = False
  offset: bool = False  # (1 + weight), initialised 0 (Gemma)

  @nn.compact
  def __call__(self, x_BTD):
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    weight_D = self.param("weight", init, (x_BTD.shape[-1],), self.param_dtype)
    return rms_norm(x_BTD, weight_D, self.eps, self.weight_f32, self.offset)


def family_norm(cfg: LlamaConfig, param_dtype, name: str) -> RMSNorm:
  """The RMSNorm of `cfg`'s family."""
  return RMSNorm(cfg.rms_norm_eps, param_dtype, cfg.norm_weight_f32, cfg.gemma,
                 name=name)
