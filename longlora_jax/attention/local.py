"""Attention that a layer's own shape bounds: within a sliding window, and
with Gemma 2's logit soft-cap; which implementations apply them.

The rule that picks a layer's attention is `dispatch.layer_attention`.
"""

from longlora_jax.attention.chunked import chunked_causal_attention
from longlora_jax.attention.dense import dense_causal_attention
from longlora_jax.core.errors import LongLoraError

# Implementations that apply a soft-cap (cuDNN's fused attention has none).
SOFTCAP_IMPLEMENTATIONS = ("auto", "pallas", "dense", "chunked",
                           "pallas_interpret")


def check_softcap(implementation: str, softcap) -> None:
  """LongLoraError for a soft-capped model on an implementation without it."""
  if softcap and implementation not in SOFTCAP_IMPLEMENTATIONS:
    raise LongLoraError(
        f"attention implementation {implementation!r} has no logit "
        f"soft-cap, which this model needs; choose one of "
        f"{SOFTCAP_IMPLEMENTATIONS}")


def windowed_attention(q_BTNH, k_BTKH, v_BTKH, *, window: int,
                       segment_ids_BT=None, implementation: str = "chunked",
                       softcap: float | None = None):
  """Full causal attention within a sliding `window` (the attention
  signature plus `window`): "dense" or "chunked", the implementations that
  apply a window (the fused kernels do not)."""
  fn = (dense_causal_attention if implementation == "dense" else
        chunked_causal_attention)
  return fn(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT=segment_ids_BT,
            window=window, softcap=softcap)


def refuse_window(*args, **kwargs):
  raise LongLoraError("sliding-window layers have no context-parallel form "
                      "yet; use a mesh without a context axis (e.g. "
                      "fsdp=-1)")
