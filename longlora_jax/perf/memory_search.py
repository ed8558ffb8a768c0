"""The largest context whose compiled train step fits the memory a JAX
process gets on a GPU, and the pinned host memory its offloaded
activations get (`eval.memory_plan --find-max-ctx`)."""

import math
import os

from longlora_jax.perf import gpu_target
from longlora_jax.core.errors import LongLoraError

# JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION: what it preallocates.
DEFAULT_MEM_FRACTION = 0.75


def program_gib(compiled) -> dict:
  """XLA's memory analysis of a compiled program, GiB per device; "total"
  is what it holds on the device at its peak (arguments + outputs - the
  donated ones they alias + temporaries), "host_temporaries" the pinned
  host memory it holds (offloaded activations)."""
  mem = compiled.memory_analysis()
  gib = 2.0 ** 30
  return {
      "arguments": mem.argument_size_in_bytes / gib,
      "outputs": mem.output_size_in_bytes / gib,
      "aliased": mem.alias_size_in_bytes / gib,
      "temporaries": mem.temp_size_in_bytes / gib,
      "total": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / gib,
      "host_temporaries": mem.host_temp_size_in_bytes / gib,
  }


def with_update(grads: dict, update: dict, frozen_gib: float) -> dict:
  """The plan of a step run as two programs (`--offload optimizer`): the
  gradients' `program_gib`, with "update_total", the update's total plus
  the frozen weights that stay on the device beside it (the update brings
  the masters and moments there; compile-only devices, which have no host
  memory, plan them there as its arguments), and "total" the larger."""
  update_total = update["total"] + frozen_gib
  return {**grads, "update_total": update_total,
          "total": max(grads["total"], update_total)}


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


def host_gib(target: str, given: float | None = None) -> tuple[float, str]:
  """(GiB of pinned host memory per GPU the offloaded activations may use,
  where that figure comes from): `given` (--host-gib) if set, else the
  target's stated default."""
  if given is not None:
    return given, "--host-gib"
  if target == "cpu":  # no machine to take a share of
    return math.inf, "unbounded without --host-gib on --target cpu"
  gpu = gpu_target.GPUS[target]
  return gpu.host_gib, f"default for --target {target}: {gpu.host_gib_why}"


def host_need(memory: dict, offload: str, layer_inputs_gib: float,
              optimizer_gib: float = 0.0) -> dict:
  """The pinned host memory (GiB per device) a train step needs, and where
  the figure comes from: XLA's memory analysis (`memory`) when it reports
  host temporaries, else, for offloaded activations, the layer inputs kept
  for the backward pass, counted by hand; plus, where `offload` names the
  optimizer, the bytes of what it updates (`optimizer_gib`: the float32
  masters and their moments, arrays that no memory analysis reports)."""
  parts = offload.split(",")
  extra = optimizer_gib if "optimizer" in parts else 0.0
  plus = " + the optimizer's masters and moments" if extra else ""
  if memory["host_temporaries"] > 0 or "activations" not in parts:
    return {"host_gib": memory["host_temporaries"] + extra,
            "host_from": "XLA memory analysis" + plus}
  return {"host_gib": layer_inputs_gib + extra,
          "host_from": "hand count: layers x layer-input bytes" + plus}


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


def find_max_ctx(plan_at, ctx_step: int, usable: tuple[float, str],
                 host: tuple[float, str], *, s2: bool = True,
                 offload_more: str | None = "activations,optimizer",
                 report=print) -> dict:
  """The largest multiple of `ctx_step` whose train step, as `plan_at(ctx)`
  compiles it, fits both `usable` device memory (`usable_gib`'s answer)
  and `host` pinned host memory (`host_gib`'s); with its plan, the plan of
  the smallest context that did not fit, the limit it broke ("device",
  "host" or both), and every probe, each passed to `report` as a line
  (None: silent). `offload_more`: the --offload to suggest when even
  `ctx_step` does not fit the device (None: the plans offload all)."""
  from longlora_jax.attention.groups import s2_group_size
  usable, source = usable
  host, host_source = host
  device_hint = (f"--offload {offload_more} (device) or " if offload_more
                 else "")
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
    device, pinned = (plans[ctx]["per_device_gib"]["total"],
                      plans[ctx]["host_gib"])
    over = [name for name, need, have in (("device", device, usable),
                                          ("host", pinned, host))
            if need > have]
    probes.append({"ctx": ctx, "device_gib": device, "host_gib": pinned,
                   "fits": not over, "over": over})
    if report is not None:
      report(f"probe {len(probes)}: ctx {ctx:>9,}  {device:7.2f} GiB per "
             f"device, {pinned:7.2f} GiB pinned host  "
             f"{'fits' if not over else 'does not fit'} {usable:.2f} GiB "
             f"and {host:.2f} GiB host"
             f"{'' if not over else ' (over: ' + ', '.join(over) + ')'}")
    return not over

  best = largest_fitting(fits, ctx_step)
  if best is None:
    first = probes[0]
    raise LongLoraError(
        f"even --ctx-step {ctx_step} tokens need {first['device_gib']:.2f} "
        f"GiB per device and {first['host_gib']:.2f} GiB pinned host, over "
        f"the usable {usable:.2f} and {host:.2f} GiB "
        f"({' and '.join(first['over'])}); try {device_hint}a larger "
        "--host-gib (host), a larger mesh or a smaller "
        "--ctx-step")
  beyond = min((p for p in probes if not p["fits"]), key=lambda p: p["ctx"])
  return {"usable_gib": usable, "usable_from": source, "host_gib": host,
          "host_from": host_source, "max_ctx": best,
          "binding": " and ".join(beyond["over"]), "probes": probes,
          "plan": plans[best], "next_plan": plans[beyond["ctx"]]}


def print_found(found, print_plan, print_largest) -> None:
  """The answer under the plan of the context found (`print_plan`), and
  the largest buffers (`print_largest`) of the next probe, which did not
  fit."""
  best = found["plan"]
  print()
  print_plan(best)
  print(f"largest context that fits {found['usable_gib']:.2f} GiB per device "
        f"({found['usable_from']}) and {found['host_gib']:.2f} GiB of pinned "
        f"host memory per GPU ({found['host_from']}): {found['max_ctx']:,} "
        f"tokens, {best['per_device_gib']['total']:.2f} GiB per device and "
        f"{best['host_gib']:.2f} GiB of pinned host memory "
        f"({best['host_from']})")
  beyond = found["next_plan"]
  print(f"binding limit: {found['binding']}; {beyond['ctx']:,} tokens need "
        f"{beyond['per_device_gib']['total']:.2f} GiB per device and "
        f"{beyond['host_gib']:.2f} GiB pinned host; there:")
  print_largest(beyond)
