import shutil

import pytest

from bench import kernel_resources
from longlora_jax.attention.pallas.grouped import default_config
from longlora_jax.core.errors import LongLoraError
from longlora_jax.perf import gpu_target

# What ptxas 13.0 -v prints for a kernel that spills (its layout, with
# numbers written for this test).
REPORT = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'grouped_attention_dq' for 'sm_90a'
ptxas info    : Function properties for grouped_attention_dq
    32 bytes stack frame, 24 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes smem
ptxas info    : Compile time = 1.398 ms
"""


def test_reads_what_ptxas_reports(tmp_path):
  fake = tmp_path / "ptxas"
  (tmp_path / "report.txt").write_text(REPORT)
  fake.write_text(f"#!/bin/sh\ncat {tmp_path / 'report.txt'} >&2\n")
  fake.chmod(0o755)
  assert kernel_resources.ptxas_resources(".entry k", "sm_90a",
                                          ptxas=str(fake)) == dict(
      registers=255, spill_stores=24, spill_loads=28, static_shared=16)


def test_a_failing_ptxas_is_an_error(tmp_path):
  fake = tmp_path / "ptxas"
  fake.write_text("#!/bin/sh\necho 'ptxas fatal : Unresolved' >&2\nexit 255\n")
  fake.chmod(0o755)
  with pytest.raises(LongLoraError, match="ptxas failed: ptxas fatal"):
    kernel_resources.ptxas_resources(".entry k", "sm_90a", ptxas=str(fake))


@pytest.mark.skipif(not (gpu_target.AVAILABLE and shutil.which("ptxas")),
                    reason="needs JAX's CUDA plugin and CUDA's ptxas")
def test_the_default_tiles_do_not_spill_on_an_h100():
  # Llama-2 7B's heads at 8k: the three kernels as the H100 would assemble
  # them, each within the 255 registers a thread can have and no spills.
  found = kernel_resources.kernel_resources(default_config(128), seq=8192)
  assert set(found) == {"forward", "dq", "dkv"}
  for kernel in found.values():
    assert 0 < kernel["registers"] <= 255
    assert kernel["spill_stores"] == kernel["spill_loads"] == 0


def test_without_ptxas_one_line_names_the_install(monkeypatch):
  monkeypatch.setattr(shutil, "which", lambda name: None)
  with pytest.raises(LongLoraError, match="ptxas not found: .*CUDA"):
    kernel_resources.main([])
