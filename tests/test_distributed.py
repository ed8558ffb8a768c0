import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices, **extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("LONGLORA_", "SLURM_", "OMPI_"))}
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             **extra)
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  worker = [sys.executable, "-m", "tests.multihost_worker"]
  single = subprocess.run([*worker, str(tmp_path / "one.npz")], cwd=ROOT,
                          env=_env(8), capture_output=True, text=True,
                          timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  port = _free_port()
  procs = [subprocess.Popen(
      [*worker, str(tmp_path / "two.npz")], cwd=ROOT,
      env=_env(4, LONGLORA_COORDINATOR=f"127.0.0.1:{port}",
               LONGLORA_NUM_PROCESSES="2", LONGLORA_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  assert (int(one["processes"]), int(one["devices"])) == (1, 8)
  assert (int(two["processes"]), int(two["devices"])) == (2, 8)
  np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-6)
  names = sorted(set(one.files) - {"loss", "processes", "devices"})
  assert len(names) > 10
  # atol: 1e-4 of the learning rate (1e-2), the scale of one Adam step; the
  # all-reduce order differs between gloo and one process.
  for name in names:
    np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)
