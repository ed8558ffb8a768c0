"""The sections of `eval.gpu_check`, each run in its own process:
`section(smoke, save) -> dict` (JSON-able); `save(partial)` records what
is measured so far, which is what remains if the section runs out of time.
`SECTIONS` names them in the order they run; the kernels' sections are in
`gpu_kernels`, the train and generation ones in `gpu_steps`."""

import importlib.metadata
import subprocess
import sys

import jax
import jax.numpy as jnp

from bench import gpu_kernels, gpu_steps
from longlora_jax.attention.dispatch import FUSED_PREFERENCE, fused_for
from longlora_jax.attention.pallas import grouped as pallas_grouped
from longlora_jax.model.flops import peak_flops
from longlora_jax.perf import gpu_target

PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax",
            "optax", "orbax-checkpoint", "numpy", "transformers", "torch",
            "triton", "jax-triton", "nvidia-cudnn-cu12", "nvidia-cudnn-cu13")


def env(smoke, save):
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  device = jax.devices()[0]
  try:
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
         "clocks.max.sm,power.limit", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
  except (OSError, subprocess.SubprocessError) as e:
    smi = repr(e)
  return dict(python=sys.version.split()[0], packages=versions,
              backend=jax.default_backend(), jax=jax.__version__,
              device_kind=device.device_kind, devices=len(jax.devices()),
              compute_capability=getattr(device, "compute_capability", None),
              memory_stats=device.memory_stats(), nvidia_smi=smi,
              peak_bf16_flops=peak_flops(device),
              pallas_available=pallas_grouped.AVAILABLE,
              compile_only_available=gpu_target.AVAILABLE,
              fused_preference=list(FUSED_PREFERENCE),
              auto=fused_for(128, jnp.bfloat16) or "dense/chunked")


SECTIONS = {
    "env": env,
    "correctness": gpu_kernels.correctness,
    "train_pallas": gpu_steps.train_pallas,
    "train_cudnn": gpu_steps.train_cudnn,
    "bench": gpu_kernels.bench,
    "sweep": gpu_kernels.sweep,
    "plan": gpu_steps.plan,
    "train_offload": gpu_steps.train_offload,
    "train_7b": gpu_steps.train_7b,
    "generate_7b": gpu_steps.generate_7b,
    "train_7b_offload": gpu_steps.train_7b_offload,
    "sweep_wide": gpu_kernels.sweep_wide,
}
