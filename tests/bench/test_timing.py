"""bench.timing with a fake clock: which runs count, when a run ends, the
median and minimum, worked out by hand."""

import sys

import pytest

from bench import timing


class Fake:
  """A clock that reads the next of `ticks`, and a run and a `block` that
  log what happens in order."""

  def __init__(self, ticks, results):
    self.ticks, self.results, self.log = iter(ticks), iter(results), []

  def clock(self):
    self.log.append("clock")
    return next(self.ticks)

  def run(self):
    self.log.append("run")
    return next(self.results)

  def block(self, result):
    self.log.append(f"ready {result}")
    return result


def test_each_repeat_runs_from_its_call_until_its_result_is_ready():
  fake = Fake([0.0, 5.0, 10.0, 11.0, 20.0, 23.0, 30.0, 30.5],
              ["w", "a", "b", "c"])
  t = timing.timed(fake.run, 3, clock=fake.clock, block=fake.block)
  # The warm-up: 0 -> 5; the repeats: 10 -> 11, 20 -> 23, 30 -> 30.5.
  assert t.warmup_s == 5.0
  assert t.times_s == (1.0, 3.0, 0.5)
  assert (t.median_s, t.min_s) == (1.0, 0.5)
  assert (t.first, t.results) == ("w", ("a", "b", "c"))
  assert fake.log == ["clock", "run", "ready w", "clock"] + [
      e for r in "abc" for e in ("clock", "run", f"ready {r}", "clock")]


def test_warmups_are_excluded_and_an_even_median_is_the_middle_mean():
  fake = Fake([0, 9, 10, 14, 20, 21, 30, 33, 40, 42],
              ["w1", "w2", "a", "b", "c", "d"])
  t = timing.timed(fake.run, 4, warmup=2, clock=fake.clock, block=fake.block)
  # Two warm-ups, 0 -> 9 together; runs of 4, 1, 3 and 2 s.
  assert t.warmup_s == 9
  assert t.times_s == (4, 1, 3, 2)
  assert (t.median_s, t.min_s) == (2.5, 1)
  assert t.first == "w1" and t.results == ("a", "b", "c", "d")


def test_a_run_may_report_its_own_seconds():
  # (seconds the run measured, extras): 0.25 s and 0.75 s measured, the
  # third by its wall time, 8 -> 10.
  fake = Fake([0, 1, 2, 4, 5, 6, 8, 10],
              [(None, "w"), (0.25, "a"), (0.75, "b"), (None, "c")])
  t = timing.timed(fake.run, 3, seconds=lambda r: r[0], clock=fake.clock,
                   block=fake.block)
  assert t.times_s == (0.25, 0.75, 2)
  assert (t.median_s, t.min_s) == (0.75, 0.25)
  assert t.results[-1] == (None, "c")


def test_no_warmup_and_no_repeats():
  fake = Fake([0, 0, 1, 3], ["a"])
  t = timing.timed(fake.run, 1, warmup=0, clock=fake.clock, block=fake.block)
  assert (t.warmup_s, t.times_s, t.first) == (0, (2,), None)
  with pytest.raises(ValueError, match="repeats 0"):
    timing.timed(fake.run, 0)


def test_blocks_on_jax_arrays_only_when_jax_is_loaded(monkeypatch):
  import jax
  waited = []
  monkeypatch.setattr(jax, "block_until_ready",
                      lambda x: waited.append(x) or x)
  assert timing.block_until_ready("x") == "x" and waited == ["x"]
  monkeypatch.delitem(sys.modules, "jax")
  assert timing.block_until_ready("y") == "y" and waited == ["x"]
