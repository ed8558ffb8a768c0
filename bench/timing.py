"""Timing a repeated run, as every benchmark times one: warm-up runs
(compilation) excluded, each timed run from its call until its result is
ready, the median and minimum of the repeats."""

import dataclasses
import statistics
import sys
import time
from typing import Any, Callable


def block_until_ready(result):
  """`result` once its JAX arrays are computed (dispatch is asynchronous).
  Without JAX loaded it holds none: PyTorch's side of bench.vs_torch never
  loads it."""
  jax = sys.modules.get("jax")
  return result if jax is None else jax.block_until_ready(result)


@dataclasses.dataclass(frozen=True)
class Timing:
  """times_s: each timed run's seconds; results: what each returned;
  warmup_s: the warm-up runs' seconds in all; first: what the first
  warm-up run returned (None without one)."""
  times_s: tuple[float, ...]
  results: tuple
  warmup_s: float
  first: Any

  @property
  def median_s(self) -> float:
    """The median of the timed runs (of an even number: the middle two's
    mean)."""
    return statistics.median(self.times_s)

  @property
  def min_s(self) -> float:
    """The fastest timed run."""
    return min(self.times_s)


def timed(run: Callable[[], Any], repeats: int, *, warmup: int = 1,
          seconds: Callable[[Any], float | None] | None = None,
          clock: Callable[[], float] = time.perf_counter,
          block: Callable[[Any], Any] = block_until_ready) -> Timing:
  """Calls `run()` `warmup` times untimed, then `repeats` times, each timed
  from its call until `block` returns its result ready.

  `seconds(result)`, when given, is the time a run measured itself (e.g. a
  generation's decode steps without its prefill), None for its wall time.
  """
  if repeats < 1:
    raise ValueError(f"repeats {repeats}: time at least one run")
  first, start = None, clock()
  for i in range(warmup):
    result = block(run())
    first = result if i == 0 else first
  warmup_s = clock() - start
  times, results = [], []
  for _ in range(repeats):
    start = clock()
    result = block(run())
    wall = clock() - start
    own = seconds(result) if seconds else None
    times.append(wall if own is None else own)
    results.append(result)
  return Timing(tuple(times), tuple(results), warmup_s, first)


def peak_bytes() -> int | None:
  """The first device's running maximum of allocated bytes since the
  process started (None where the backend keeps no count: the CPU)."""
  import jax
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")
