import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests import conftest

ROOT = str(conftest.ROOT)


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


WORKER = [sys.executable, "-m", "tests.multihost_worker"]


def _two_processes(*args):
  """Runs the worker as 2 processes of 4 CPU devices each."""
  port = _free_port()
  procs = [subprocess.Popen(
      [*WORKER, *map(str, args)], cwd=ROOT,
      env=_env(4, LONGLORA_COORDINATOR=f"127.0.0.1:{port}",
               LONGLORA_NUM_PROCESSES="2", LONGLORA_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]


def test_two_processes_equal_one(tmp_path):
  single = subprocess.run([*WORKER, "train", str(tmp_path / "one.npz")],
                          cwd=ROOT, env=_env(8), capture_output=True,
                          text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  _two_processes("train", tmp_path / "two.npz")
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


def test_each_process_reads_only_its_own_slices(tmp_path):
  # fsdp over 2 processes x 4 devices: every tensor of this model is split
  # 8 ways, so each process reads exactly half of the weights' bytes.
  import jax
  from longlora_jax import init_params, save_hf
  from tests.multihost_worker import CFG
  directory = save_hf(CFG, init_params(CFG, jax.random.key(0)),
                      tmp_path / "ckpt", dtype="float32")
  model_bytes = (directory / "model.safetensors").stat().st_size
  _two_processes("load", directory, tmp_path / "read")
  read = [json.loads((tmp_path / f"read.{i}").read_text()) for i in range(2)]
  assert [r["devices"] for r in read] == [4, 4]
  params = sum(x.size for x in jax.tree.leaves(init_params(
      CFG, jax.random.key(0)))) * 4
  assert model_bytes > params > model_bytes - 10_000  # header aside
  assert [r["read"] for r in read] == [params // 2, params // 2]
