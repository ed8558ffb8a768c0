"""Compile for an NVIDIA GPU that is not here.

JAX's CUDA plugin carries all of XLA:GPU. Given a description of the target
it compiles without a GPU, a driver or the CUDA libraries ("compile-only"
devices), so a program's memory analysis is XLA:GPU's own: its fusions, its
bfloat16 support and its buffer assignment, which XLA:CPU does not
reproduce. Running still needs the real GPU.

  devices = gpu_target.devices("h100", 8)   # then a Mesh over them
"""

import contextlib
import dataclasses
import importlib.util
import re
from pathlib import Path

# JAX's CUDA plugins (each carries XLA:GPU): CUDA 12 and CUDA 13.
PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


# Whether one of them (the compiler) is installed; `devices` names the
# install when none is.
AVAILABLE = any(map(_installed, PLUGINS))
# The cuDNN version the targets declare (dnn_version_info below).
CUDNN_VERSION = 90800


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  """The numbers XLA:GPU's cost models and tiling heuristics read."""
  name: str
  compute_capability: tuple[int, int]
  sm_count: int
  fp32_units_per_sm: int
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int
  l2_bytes: int
  clock_ghz: float
  memory_bandwidth: int  # bytes/s
  # Nominal; XLA only uses it for heuristics (it never rejects a program
  # that needs more), so compare the plan's total with it yourself.
  memory_bytes: int = 80 * 2**30
  # Peak dense bfloat16 tensor-core TFLOP/s (FP32 accumulate, no sparsity):
  # for MFU, not read by XLA.
  peak_bf16_tflops: float = 0.0
  # `--find-max-ctx`'s default pinned host memory per GPU (GiB) for
  # offloaded activations: the usual machine's RAM over its GPUs.
  host_gib: float = 0.0
  host_gib_why: str = ""

  @property
  def arch(self) -> str:
    """The PTX target XLA compiles for: sm_XY, with Hopper's "a" features."""
    major, minor = self.compute_capability
    return f"sm_{major}{minor}{'a' if major == 9 else ''}"


# From NVIDIA's data sheets and architecture whitepapers: the H100 SXM5
# and A100 SXM4 80GB data sheets, the Hopper and Ampere whitepapers (SMs,
# L2, clocks); the Ada whitepaper's appendix (RTX 4090: 128 SMs, 72 MB L2,
# 2.52 GHz boost, 1008 GB/s, 165.2 dense BF16 TFLOP/s with FP32
# accumulate) and the L40S data sheet (142 SMs, 96 MB L2, 2.52 GHz, 864
# GB/s, 362.05 dense BF16 TFLOP/s). Shared memory per SM is the CUDA
# programming guide's per compute capability (8.9: 100 KB, 99 KB a block).
GPUS = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", (9, 0), sm_count=132,
                    fp32_units_per_sm=128, shared_memory_per_sm=233472,
                    shared_memory_per_block_optin=232448,
                    l2_bytes=50 * 2**20, clock_ghz=1.98,
                    memory_bandwidth=3_350_000_000_000,
                    peak_bf16_tflops=989.4, host_gib=256,
                    host_gib_why="a DGX H100: 2 TB of RAM over 8 GPUs"),
    "a100": GpuSpec("NVIDIA A100-SXM4-80GB", (8, 0), sm_count=108,
                    fp32_units_per_sm=64, shared_memory_per_sm=167936,
                    shared_memory_per_block_optin=166912,
                    l2_bytes=40 * 2**20, clock_ghz=1.41,
                    memory_bandwidth=2_039_000_000_000,
                    peak_bf16_tflops=312.0, host_gib=256,
                    host_gib_why="a DGX A100 80GB: 2 TB of RAM over 8 GPUs"),
    "l40s": GpuSpec("NVIDIA L40S", (8, 9), sm_count=142,
                    fp32_units_per_sm=128, shared_memory_per_sm=102400,
                    shared_memory_per_block_optin=101376,
                    l2_bytes=96 * 2**20, clock_ghz=2.52,
                    memory_bandwidth=864_000_000_000,
                    memory_bytes=48 * 2**30, peak_bf16_tflops=362.05,
                    host_gib=128,
                    host_gib_why="a 4-GPU server with 512 GB of RAM, one "
                                 "quarter each"),
    "rtx4090": GpuSpec("NVIDIA GeForce RTX 4090", (8, 9), sm_count=128,
                       fp32_units_per_sm=128, shared_memory_per_sm=102400,
                       shared_memory_per_block_optin=101376,
                       l2_bytes=72 * 2**20, clock_ghz=2.52,
                       memory_bandwidth=1_008_000_000_000,
                       memory_bytes=24 * 2**30, peak_bf16_tflops=165.2,
                       host_gib=64,
                       host_gib_why="a workstation with 128 GB of RAM: "
                                    "half of it pinned, the rest for the "
                                    "OS, the loader and the data"),
}


def target_config(spec: GpuSpec) -> str:
  """XLA's GpuTargetConfigProto, in text format, for `spec`."""
  major, minor = spec.compute_capability
  return f"""
gpu_device_info {{
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: {spec.shared_memory_per_block_optin}
  shared_memory_per_core: {spec.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {spec.sm_count}
  fpus_per_core: {spec.fp32_units_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {spec.memory_bandwidth}
  l2_cache_size: {spec.l2_bytes}
  clock_rate_ghz: {spec.clock_ghz}
  device_memory_size: {spec.memory_bytes}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
runtime_version {{ major: 12 minor: 8 patch: 0 }}
device_description_str: "{spec.name}"
"""


def devices(target: str, count: int) -> list:
  """`count` compile-only devices of GPU `target` (a key of GPUS), one host."""
  # Imported here: callers set JAX_PLATFORMS before JAX is first imported.
  import jax
  from jax.experimental import topologies

  from longlora_jax.core.errors import LongLoraError
  if target not in GPUS:
    raise LongLoraError(f"unknown GPU target {target!r}; choose one of "
                        f"{', '.join(sorted(GPUS))}")
  try:
    topology = topologies.get_topology_desc(
        platform="cuda", topology=f"1x1x{count}",
        target_config=target_config(GPUS[target]))
  except (NotImplementedError, RuntimeError) as e:
    raise LongLoraError(
        f"compiling for {target} needs JAX's CUDA compiler (no GPU needed): "
        f"pip install 'jax[cuda12-local]=={jax.__version__}' "
        f"nvidia-cuda-runtime-cu12, or use --target cpu "
        f"({type(e).__name__}: {e})") from None
  return list(topology.devices)


def compile_to_ptx(fn, args, devices, dump_dir):
  """Compiles `fn` for `args` (ShapeDtypeStructs placed on the compile-only
  `devices`) with XLA:GPU, dumping into `dump_dir`: the executable and
  each GPU kernel's PTX by its entry name (XLA's fusions and the Triton
  kernels of Pallas calls alike)."""
  import jax
  import numpy as np
  # The mesh names the GPU the Triton kernels are for (jax >= 0.11); XLA
  # >= 0.11 dumps PTX only for the kernels xla_dump_emitter_re matches.
  with jax.set_mesh(jax.sharding.Mesh(np.array(devices), ("x",))):
    lowered = jax.jit(fn).trace(*args).lower()
  compiled = lowered.compile({"xla_dump_to": str(dump_dir),
                              "xla_dump_emitter_re": ".*"})
  kernels = {}
  for path in sorted(Path(dump_dir).glob("*.ptx")):
    ptx = path.read_text()
    if entry := re.search(r"\.entry (\w+)", ptx):
      kernels[entry.group(1)] = ptx
  return compiled, kernels


@contextlib.contextmanager
def assume_cudnn():
  """While tracing for a GPU that is not here: JAX's cuDNN attention asks
  the local libcudnn for its version (which only feeds feature checks); a
  host without one answers with the targets' `CUDNN_VERSION`."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
    original = cudnn_attention.check_cudnn_version
  except (ImportError, AttributeError):  # another jax: nothing to pin
    yield
    return
  try:
    original()
  except RuntimeError:
    cudnn_attention.check_cudnn_version = lambda: CUDNN_VERSION
  try:
    yield
  finally:
    cudnn_attention.check_cudnn_version = original
