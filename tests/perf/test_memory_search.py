import pytest

from longlora_jax.perf import memory_search
from longlora_jax.core.errors import LongLoraError


def test_largest_fitting_bisects_on_the_grid():
  # A fake plan: 2 GiB plus 0.5 GiB per 8192 tokens. 9.6 GiB fits 15 steps
  # (9.5 GiB), not 16 (10 GiB); 10 GiB fits 16 exactly.
  probed = []

  def fits(usable):
    def check(ctx):
      probed.append(ctx)
      return 2 + 0.5 * ctx / 8192 <= usable
    return check

  assert memory_search.largest_fitting(fits(9.6), 8192) == 15 * 8192
  # Doubling 1, 2, 4, 8, 16 steps, then bisecting 8..16: 12, 14, 15.
  assert probed == [k * 8192 for k in (1, 2, 4, 8, 16, 12, 14, 15)]
  assert memory_search.largest_fitting(fits(10.0), 8192) == 16 * 8192
  assert memory_search.largest_fitting(fits(2.4), 8192) is None
  assert memory_search.largest_fitting(fits(2.5), 8192) == 8192


def test_usable_memory_is_what_jax_preallocates(monkeypatch):
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  gib, source = memory_search.usable_gib("h100")
  assert gib == 0.75 * 80 and "default" in source
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".9")
  gib, source = memory_search.usable_gib("h100")
  assert gib == 0.9 * 80 and "XLA_PYTHON_CLIENT_MEM_FRACTION" in source
  assert memory_search.usable_gib("h100", 50)[0] == 50
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "90%")
  with pytest.raises(LongLoraError, match="not a fraction"):
    memory_search.usable_gib("h100")
  with pytest.raises(LongLoraError, match="needs --usable-gib"):
    memory_search.usable_gib("cpu")


def test_the_host_budget_binds_and_is_reported():
  # A fake plan: 1 + ctx/8192 GiB per device, ctx/4096 GiB pinned host.
  # 10 GiB of device fits 9 steps of 8192; 8 GiB of host only 4.
  plan_at = lambda ctx: {"ctx": ctx, "per_device_gib": {"total": 1 + ctx / 8192},
                         "host_gib": ctx / 4096}
  found = memory_search.find_max_ctx(plan_at, 8192, (10.0, "given"),
                                     (8.0, "given"), report=None)
  assert (found["max_ctx"], found["binding"]) == (4 * 8192, "host")
  assert found["next_plan"]["ctx"] == 5 * 8192
  found = memory_search.find_max_ctx(plan_at, 8192, (4.5, "given"),
                                     (8.0, "given"), report=None)
  assert (found["max_ctx"], found["binding"]) == (3 * 8192, "device")
  with pytest.raises(LongLoraError, match=r"\(host\); try"):
    memory_search.find_max_ctx(plan_at, 8192, (10.0, "given"),
                               (1.0, "given"), report=None)


def test_host_budget_defaults_per_target():
  assert memory_search.host_gib("h100") == (
      256, "default for --target h100: a DGX H100: 2 TB of RAM over 8 GPUs")
  assert memory_search.host_gib("rtx4090")[0] == 64
  assert memory_search.host_gib("cpu", 3.0) == (3.0, "--host-gib")
  assert memory_search.host_gib("cpu")[0] == float("inf")
  # Offloaded activations XLA does not report are counted by hand.
  xla = {"host_temporaries": 2.0}
  assert memory_search.host_need(xla, "activations", 1.5) == {
      "host_gib": 2.0, "host_from": "XLA memory analysis"}
  assert memory_search.host_need({"host_temporaries": 0.0}, "activations",
                                 1.5)["host_from"].startswith("hand count")
  # The optimizer's masters and moments are arrays, not temporaries: their
  # bytes add.
  assert memory_search.host_need(xla, "activations,optimizer", 1.5, 0.25) == {
      "host_gib": 2.25,
      "host_from": "XLA memory analysis + the optimizer's masters and moments"}
  assert memory_search.host_need({"host_temporaries": 0.0}, "optimizer", 1.5,
                                 0.25)["host_gib"] == 0.25
  assert memory_search.host_need(xla, "none", 1.5, 0.25)["host_gib"] == 2.0


def test_a_two_program_step_plans_the_larger_of_its_programs():
  grads = {"arguments": 6.0, "total": 20.0, "host_temporaries": 4.0}
  planned = memory_search.with_update(grads, {"total": 5.0}, frozen_gib=3.5)
  assert planned == {"arguments": 6.0, "total": 20.0,
                     "host_temporaries": 4.0, "update_total": 8.5}
  assert memory_search.with_update(grads, {"total": 18.0}, 3.5)["total"] == 21.5
