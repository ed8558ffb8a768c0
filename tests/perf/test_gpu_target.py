import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from longlora_jax.perf import gpu_target
from longlora_jax.core.errors import LongLoraError

@pytest.mark.skipif(not gpu_target.AVAILABLE,
                    reason="needs jax[cuda12-local] (requirements-test.txt)")
@pytest.mark.parametrize("target, kind, arch", [
    ("h100", "NVIDIA H100 80GB HBM3", "sm_90a"),
    ("a100", "NVIDIA A100-SXM4-80GB", "sm_80"),
    ("l40s", "NVIDIA L40S", "sm_89"),  # Ada: the plugin compiles sm_89
    ("rtx4090", "NVIDIA GeForce RTX 4090", "sm_89"),
])
def test_compiles_sharded_code_for_the_named_gpu(target, kind, arch,
                                                 tmp_path):
  devices = gpu_target.devices(target, 4)
  assert [d.device_kind for d in devices] == [kind] * 4
  sharding = NamedSharding(Mesh(np.array(devices), ("x",)), P("x"))
  x = jax.ShapeDtypeStruct((4096, 512), jnp.bfloat16, sharding=sharding)
  compiled, kernels = gpu_target.compile_to_ptx(
      lambda x: jnp.tanh(x) * 2, [x], devices, tmp_path)
  # Each device holds a quarter of the rows: 1024 x 512 bfloat16.
  assert compiled.memory_analysis().argument_size_in_bytes == 1024 * 512 * 2
  ptx, = kernels.values()  # the one kernel XLA generated: a fusion
  assert re.search(rf"^\.target {arch}\b", ptx, re.M)
  assert gpu_target.GPUS[target].arch == arch  # what the plans print
  assert "fusion" in next(iter(kernels))


def test_unknown_target():
  with pytest.raises(LongLoraError,
                     match="choose one of a100, h100, l40s, rtx4090"):
    gpu_target.devices("v100", 1)


def test_missing_cuda_compiler_names_the_install(monkeypatch):
  from jax.experimental import topologies

  def unavailable(*args, **kwargs):
    raise NotImplementedError("topology not implemented for cuda")
  monkeypatch.setattr(topologies, "get_topology_desc", unavailable)
  with pytest.raises(LongLoraError, match=re.escape("pip install 'jax[cuda12-local]")):
    gpu_target.devices("h100", 8)
