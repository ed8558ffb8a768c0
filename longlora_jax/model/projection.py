"""`x @ kernel` for every kernel the parameter tree holds: a plain array, a
4-bit `NF4Tensor` (dequantized where it is used) or a `LoRA` node over
either (its low-rank update added, so `w + ba` is never formed)."""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from longlora_jax.model.lora import LoRA, delta
from longlora_jax.model.nf4 import NF4Tensor, dequantize

DType = Any


def project(x_BTD, kernel_DF, dtype: DType):
  """`x @ kernel` in the compute dtype; for a `LoRA` kernel, `x @ w` plus its
  low-rank update, so `w + ba` is never formed."""
  if isinstance(kernel_DF, LoRA):
    return project(x_BTD, kernel_DF.w, dtype) + delta(x_BTD, kernel_DF, dtype)
  if isinstance(kernel_DF, NF4Tensor):
    return _project_nf4(x_BTD, kernel_DF, dtype)
  return jnp.einsum("...D,DF->...F", x_BTD.astype(dtype), kernel_DF.astype(dtype))


@functools.partial(jax.checkpoint, static_argnums=2, prevent_cse=False,
                   policy=jax.checkpoint_policies.nothing_saveable)
def _project_nf4(x_BTD, kernel_FD, dtype: DType):
  """`x @ w` for a 4-bit weight (torch's [out, in] blocks), dequantized to
  the compute dtype here, one layer's weight at a time. Rematerialised:
  left to itself, the backward pass's `dX = dY @ w` would keep every
  layer's dequantized weight from the forward pass, a bf16 copy of the
  whole stack; this way it keeps the 4-bit one and dequantizes again. (It
  runs inside the layers' scan, where CSE is safe: under a rematerialised
  layer the recomputed forward and the backward may share one.)"""
  return jnp.einsum("...D,FD->...F", x_BTD.astype(dtype),
                    dequantize(kernel_FD, dtype))
