from longlora_jax.core import cpus


def test_affinity_counts_the_allowed_cores(monkeypatch):
  monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0, 3},
                      raising=False)
  assert cpus.usable_cpus() == 2


def test_without_affinity_the_machine_count(monkeypatch):
  monkeypatch.delattr(cpus.os, "sched_getaffinity", raising=False)
  monkeypatch.setattr(cpus.os, "cpu_count", lambda: 6)
  assert cpus.usable_cpus() == 6
