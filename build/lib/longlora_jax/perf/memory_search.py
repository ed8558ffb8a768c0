"""The largest context whose compiled train step fits the memory a JAX
process gets on a GPU (`eval.memory_plan --find-max-ctx`)."""

import math
import os

from longlora_jax.perf import gpu_target
from longlora_jax.core.errors import LongLoraError

# JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION: what it preallocates.
DEFAULT_MEM_FRACTION = 0.75


def usable_gib(target: str, given: float | None = None) -> tuple[float, str]:
  """(GiB per device a train step may use on `target`, where that figure
  comes from): `given` (--usable-gib) if set, else JAX's preallocation."""
  if given is not None:
    return given, "--usable-gib"
  if target == "cpu":
    raise LongLoraError("--find-max-ctx on --target cpu needs --usable-gib "
                        "(or a GPU --target, e.g. h100)")
  text = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
  try:
    fraction = DEFAULT_MEM_FRACTION if text is None else float(text)
  except ValueError:
    fraction = math.nan
  if not 0 < fraction <= 1:
    raise LongLoraError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={text} is not a "
                        "fraction in (0, 1]")
  gpu = gpu_target.GPUS[target]
  source = ("XLA_PYTHON_CLIENT_MEM_FRACTION" if text is not None
            else "JAX's default preallocation")
  return (fraction * gpu.memory_bytes / 2**30,
          f"{fraction:g} x {gpu.memory_bytes / 2**30:g} GiB of the "
          f"{gpu.name}, {source}")


def largest_fitting(fits, step: int) -> int | None:
  """The largest multiple of `step` for which `fits` holds, assuming it
  holds up to some context and not beyond: doubling until a probe does not
  fit, then bisecting between the last two probes. None when `step` does
  not fit."""
  if not fits(step):
    return None
  low = 1  # in steps: fits(low * step) holds, fits(high * step) does not
  while fits(2 * low * step):
    low *= 2
  high = 2 * low
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (mid, high) if fits(mid * step) else (low, mid)
  return low * step


def find_max_ctx(plan_at, ctx_step: int, usable: tuple[float, str], *,
                 s2: bool = True, report=print) -> dict:
  """The largest multiple of `ctx_step` whose train step, as `plan_at(ctx)`
  compiles it, fits `usable` (`usable_gib`'s answer); with its plan, the
  plan of the smallest context that did not fit, and every probe, each
  passed to `report` as a line (None: silent)."""
  from longlora_jax.attention.groups import s2_group_size
  usable, source = usable
  if s2:
    try:
      s2_group_size(ctx_step)  # then every multiple splits too
    except ValueError:
      raise LongLoraError(f"--ctx-step {ctx_step} does not split into "
                          "S²-Attn groups of ctx/4; use a multiple of 8, "
                          "e.g. 8192") from None
  probes, plans = [], {}

  def fits(ctx):
    plans[ctx] = plan_at(ctx)
    m = plans[ctx]["per_device_gib"]
    probes.append({"ctx": ctx, "device_gib": m["total"],
                   "host_gib": m["host_temporaries"],
                   "fits": m["total"] <= usable})
    if report is not None:
      report(f"probe {len(probes)}: ctx {ctx:>9,}  {m['total']:7.2f} GiB per "
            f"device, {m['host_temporaries']:7.2f} GiB pinned host  "
            f"{'fits' if probes[-1]['fits'] else 'does not fit'} "
            f"{usable:.2f} GiB")
    return probes[-1]["fits"]

  best = largest_fitting(fits, ctx_step)
  if best is None:
    raise LongLoraError(
        f"even --ctx-step {ctx_step} tokens need "
        f"{probes[0]['device_gib']:.2f} GiB per device, over the usable "
        f"{usable:.2f} GiB; try --offload activations, a larger mesh or a "
        "smaller --ctx-step")
  beyond = min((p["ctx"] for p in probes if not p["fits"]), default=None)
  return {"usable_gib": usable, "usable_from": source, "max_ctx": best,
          "probes": probes, "plan": plans[best],
          "next_plan": plans.get(beyond)}


def print_found(found, print_plan, print_largest) -> None:
  """The answer under the plan of the context found (`print_plan`), and
  the largest buffers (`print_largest`) of the next probe, which did not
  fit."""
  best = found["plan"]
  print()
  print_plan(best)
  print(f"largest context that fits {found['usable_gib']:.2f} GiB per device "
        f"({found['usable_from']}): {found['max_ctx']:,} tokens, "
        f"{best['per_device_gib']['total']:.2f} GiB per device and "
        f"{best['per_device_gib']['host_temporaries']:.2f} GiB of pinned "
        "host memory")
  if (beyond := found["next_plan"]):
    print(f"{beyond['ctx']:,} tokens need "
          f"{beyond['per_device_gib']['total']:.2f} GiB per device; there:")
    print_largest(beyond)
