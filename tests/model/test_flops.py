import pytest

from longlora_jax import LlamaConfig, preset
from longlora_jax.model.flops import (attention_flops, matmul_params, paper_flops,
                                peak_flops, step_flops)


def test_matmul_params_of_llama2_7b():
  # 6,738,415,616 parameters minus the embedding (32000 x 4096) and the
  # norms (65 x 4096) enter matmuls.
  assert matmul_params(preset("llama2-7b")) == 6_738_415_616 - 131_072_000 - 266_240


def test_paper_table_is_reproduced():
  # LongLoRA Table (7B, 65,536 tokens): 3118 TFLOPs full, 1429 with S²-Attn.
  cfg = preset("llama2-7b")
  assert round(paper_flops(cfg, 65536) / 1e12) == 3118
  assert round(paper_flops(cfg, 65536, group_size=16384) / 1e12) == 1429


def test_step_flops_by_hand():
  cfg = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16,
                    num_hidden_layers=1, num_attention_heads=2)
  # matmuls: 4*8*8 + 3*8*16 + 8*10 = 720 weights -> 2*720*seq per token row.
  # causal attention, seq 4: 2 heads * 10 pairs * 4 * head_dim 4 = 320.
  assert step_flops(cfg, 4, backward=False) == 2 * 720 * 4 + 320
  assert step_flops(cfg, 4) == 3 * (2 * 720 * 4 + 320)
  assert step_flops(cfg, 4, batch=3) == 3 * step_flops(cfg, 4)


@pytest.mark.parametrize("kind,peak", [("NVIDIA H100 80GB HBM3", 989e12),
                                       ("NVIDIA H100 PCIe", 756e12),
                                       ("NVIDIA H100 NVL", 835e12),
                                       ("NVIDIA GH200 480GB", 989e12),
                                       ("NVIDIA H200", 989e12),
                                       ("NVIDIA A100-SXM4-80GB", 312e12),
                                       ("NVIDIA A100 80GB PCIe", 312e12),
                                       ("NVIDIA RTX A6000", None),
                                       ("cpu", None)])
def test_peak_flops(kind, peak):
  class Device:
    device_kind = kind
  assert peak_flops(Device()) == peak


def test_attention_flops_by_hand():
  # seq 16, 2 heads of 4: QK^T and PV cost 2 * 4 FLOPs each per kept pair.
  per_pair = 2 * 2 * 4
  # Causal: 1 + 2 + ... + 16 = 136 pairs per head.
  assert attention_flops(16, 2, 4) == 2 * 136 * per_pair == 4352
  assert attention_flops(16, 2, 4, batch=3) == 3 * 4352
  # Backward: dV, dP, dQ, dK, twice the forward; forward + backward = 3x.
  assert attention_flops(16, 2, 4, backward=True) == 3 * 4352
  # S², G = 4. Unshifted head: 4 groups of 4, 10 pairs each = 40.
  # Shifted, "flash": groups 2, 4, 4, 4, 2 = 3 + 30 + 3 = 36.
  # Shifted, "roll": 4 groups of 4 = 40.
  assert attention_flops(16, 2, 4, group_size=4) == (40 + 36) * per_pair
  assert attention_flops(16, 2, 4, group_size=4, variant="roll") == (
      80 * per_pair)
  assert attention_flops(16, 4, 4, group_size=4, backward=True) == (
      3 * 2 * 76 * per_pair)
  # Llama-2 7B at 8k, G = 2k: 16 heads with 4 groups, 16 with 3 groups and
  # two of 1k; about (4 + 3 + 2 / 4) / 2 / 16 of the 8k causal square.
  full = attention_flops(8192, 32, 128)
  assert full == 32 * 8192 * 8193 / 2 * 4 * 128
  s2 = attention_flops(8192, 32, 128, group_size=2048)
  assert s2 == 16 * (7 * 2048 * 2049 / 2 + 2 * 1024 * 1025 / 2) * 4 * 128
  assert s2 / full == pytest.approx(7.5 / 32, rel=1e-3)
  # Odd heads: of 3, the first 2 keep the groups (40 pairs each at seq 16,
  # G = 4) and the last 1 is shifted (36).
  assert attention_flops(16, 3, 4, group_size=4) == (2 * 40 + 36) * per_pair


def test_local_layers_count_their_window_by_hand():
  # Window 3 at seq 8: queries 0, 1, 2 keep 1, 2, 3 keys, the other five 3
  # each: 1 + 2 + 3 + 5 * 3 = 21 pairs per head (causal: 36).
  per_pair = 2 * 2 * 4  # head_dim 4
  assert attention_flops(8, 2, 4, window=3) == 2 * 21 * per_pair == 672
  # A window past the sequence hides nothing: causal.
  assert attention_flops(8, 2, 4, window=16) == attention_flops(8, 2, 4)
  assert attention_flops(8, 2, 4, window=8) == 2 * 36 * per_pair
  assert attention_flops(8, 2, 4, window=1) == 2 * 8 * per_pair
  # Local, global, local: matmuls 3 * (4*8*8 + 3*8*16) + 8*10 = 2000
  # weights -> 2 * 2000 * 8 = 32,000; two local layers 672 each; the
  # global one causal (2 heads * 36 pairs * 16 = 1152) or S², G = 4: the
  # unshifted head 2 groups of 10 pairs, the shifted one (flash) groups of
  # 2, 4, 2 tokens: 3 + 10 + 3 = 16; (20 + 16) * 16 = 576.
  cfg = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16,
                    num_hidden_layers=3, num_attention_heads=2,
                    sliding_window=3, layer_types=(
                        "sliding_attention", "full_attention",
                        "sliding_attention"))
  assert step_flops(cfg, 8, backward=False) == 32000 + 2 * 672 + 1152
  assert step_flops(cfg, 8, group_size=4, backward=False) == (
      32000 + 2 * 672 + 576)
  assert step_flops(cfg, 8, group_size=4) == 3 * (32000 + 2 * 672 + 576)
  # Every layer local (Mistral v0.1, Phi-3): S²'s groups change nothing.
  every = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16,
                      num_hidden_layers=3, num_attention_heads=2,
                      sliding_window=3)
  assert step_flops(every, 8, group_size=4, backward=False) == (
      32000 + 3 * 672)


@pytest.mark.parametrize("kwargs,message", [
    (dict(group_size=6), "seq=16, group_size=6"),
    (dict(group_size=4, window=8), "keeps its window"),
    (dict(group_size=4, variant="shift"), "unknown S²-Attn variant"),
])
def test_attention_flops_value_errors(kwargs, message):
  args = dict(seq=16, num_heads=2, head_dim=4) | kwargs
  with pytest.raises(ValueError, match=message):
    attention_flops(args.pop("seq"), args.pop("num_heads"),
                    args.pop("head_dim"), **args)
