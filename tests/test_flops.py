import pytest

from longlora_jax import LlamaConfig, preset
from longlora_jax.flops import matmul_params, paper_flops, peak_flops, step_flops


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
                                       ("NVIDIA A100-SXM4-80GB", 312e12),
                                       ("cpu", None)])
def test_peak_flops(kind, peak):
  class Device:
    device_kind = kind
  assert peak_flops(Device()) == peak
