"""Host memory while something runs: the anonymous resident memory of this
process (Linux's /proc/self/status), sampled every few milliseconds by a
thread, as the memory benchmarks measure a phase. Anonymous: memory-mapped
files count in RSS as file cache, which the kernel reclaims. On a CPU the
devices' buffers are host memory, so this is what a CPU run uses; on a GPU
host only the host side shows."""

import threading
from pathlib import Path


def rss_anon() -> int:
  """Bytes of this process's anonymous resident memory (RssAnon)."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("RssAnon:"):
      return int(line.split()[1]) * 1024
  raise KeyError("RssAnon")


class Peak:
  """`with Peak() as p:` samples `rss_anon` every `every_s` seconds; after
  the block `p.before`, `p.peak` and `p.after` are bytes."""

  def __init__(self, every_s: float = 0.005):
    self.every_s = every_s
    self.before = self.peak = self.after = 0
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)

  def _sample(self):
    while not self._done.wait(self.every_s):
      self.peak = max(self.peak, rss_anon())

  def __enter__(self) -> "Peak":
    self.before = self.peak = rss_anon()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._done.set()
    self._thread.join()
    self.after = rss_anon()
    self.peak = max(self.peak, self.after)
