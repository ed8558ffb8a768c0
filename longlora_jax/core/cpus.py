"""How many CPU cores this process may use."""

import os


def usable_cpus() -> int:
  """The cores this process may run on: its CPU affinity where the OS has
  one (a `taskset` or a container's limit), else the machine's count.
  XLA:CPU sizes its thread pool by the same number."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1
