"""Model FLOPs of a training step, for tokens/s, MFU and the memory plan.

Convention (as MFU is usually reported): a matmul of [m, k] x [k, n] is
2mkn FLOPs; the backward pass costs twice the forward, so a step is 3x the
forward, even where LoRA skips the frozen weights' gradients. Attention
counts only the score/value products the mask keeps (see
`attention_flops`): a local layer's window bounds them, and S²-Attn runs on
the global layers only (`dispatch.layer_attention`'s rule).
"""

from longlora_jax.attention.groups import s2_attended_pairs, shifted_heads
from longlora_jax.model.config import LlamaConfig

# Dense bf16 peak FLOP/s per device (NVIDIA data sheets, without sparsity),
# by the first name that `jax.Device.device_kind` contains: the PCIe and NVL
# parts run at lower clocks than the SXM ones their names start like.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
)


def attention_flops(seq: int, num_heads: int, head_dim: int, *,
                    batch: int = 1, group_size: int | None = None,
                    variant: str = "flash", window: int | None = None,
                    backward: bool = False) -> float:
  """Matmul FLOPs of causal attention over `batch` sequences of `seq` tokens.

  Convention: a [m, k] x [k, n] product costs 2mkn, and only the (query, key)
  pairs the mask keeps count, so QK^T and PV cost 2 * head_dim each per pair
  and head. Causal attention keeps seq * (seq + 1) / 2 pairs, about half the
  square; S²-Attn (`group_size` set) keeps the causal pairs inside its groups
  (`variant` as in `s2_attention`). A sliding `window` (a local layer; no
  groups then) keeps each query's `window` latest keys, itself included:
  min(q + 1, window) pairs for query q. `backward=True` returns forward plus
  backward, whose four products (dV, dP, dQ, dK) cost twice the forward; the
  recomputation of the scores in flash-style backwards is not counted, as MFU
  is usually reported.
  """
  if window is not None:
    if group_size is not None:
      raise ValueError("a local layer keeps its window: no S²-Attn groups")
    w = min(window, seq)
    pairs = num_heads * (w * (w + 1) // 2 + (seq - w) * w)
  elif group_size is None:
    pairs = num_heads * seq * (seq + 1) // 2
  else:
    unshifted, shifted = s2_attended_pairs(seq, group_size, variant)
    first, n_shifted = shifted_heads(num_heads)
    pairs = first * unshifted + n_shifted * shifted
  forward = 4.0 * head_dim * pairs * batch
  return 3 * forward if backward else forward


def matmul_params(config: LlamaConfig) -> int:
  """Weights that enter a matmul per token (all but the embedding lookup)."""
  c = config
  attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads
                                       + 2 * c.num_key_value_heads)
  mlp = 3 * c.hidden_size * c.intermediate_size
  return c.num_hidden_layers * (attn + mlp) + c.hidden_size * c.vocab_size


def step_flops(config: LlamaConfig, seq: int, *, batch: int = 1,
               group_size: int | None = None, backward: bool = True) -> float:
  """FLOPs of `batch` sequences of `seq` tokens; `group_size`: S²-Attn
  on the global layers (local layers keep their window)."""
  dense = 2.0 * matmul_params(config) * batch * seq
  per_layer = lambda **kind: attention_flops(
      seq, config.num_attention_heads, config.head_dim, batch=batch, **kind)
  local = sum(config.local_layers)
  attn = (config.num_hidden_layers - local) * per_layer(
      group_size=group_size)
  if local:
    attn += local * per_layer(window=config.sliding_window)
  return (dense + attn) * (3 if backward else 1)


def paper_flops(config: LlamaConfig, seq: int, *,
                group_size: int | None = None) -> float:
  """Forward FLOPs as the LongLoRA paper counts them (Table: 7B at 65,536:
  3118 TFLOPs full, 1429 S²): matmuls over all weights but the embedding,
  and attention over whole (unmasked) seq x seq or group x group squares."""
  attended = group_size or seq
  attn = (4.0 * config.num_hidden_layers * config.num_attention_heads
          * config.head_dim * seq * attended)
  return 2.0 * matmul_params(config) * seq + attn


def peak_flops(device) -> float | None:
  """Peak dense bf16 FLOP/s of a device, None when unknown (e.g. CPU)."""
  kind = getattr(device, "device_kind", "")
  if not kind.startswith("NVIDIA"):
    return None
  return next((value for name, value in PEAK_BF16_FLOPS if name in kind), None)
