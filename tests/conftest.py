import json
import os
import shutil
import subprocess
import sys
import tempfile

# Tests run on the CPU with 8 virtual devices so sharding code is exercised
# everywhere; set before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' shapes are tiny: XLA:CPU's LLVM optimisation of each compiled
# function costs more time than it saves (a third of the CPU time of
# compile-bound test files), and changes no result.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
    "--xla_backend_optimization_level=0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One XLA compilation cache for the whole run, shared by the xdist workers
# and the commands the tests start (they inherit the environment): the same
# tiny models compile once, not once per process. Made by the first process
# (the xdist controller, which starts the workers) and removed by it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="longlora-jax-tests-xla-")
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
  _OWN_CACHE = None
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

from tests.references import hf_models  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The repository root (commands run from it) and the shared test fixtures.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TOKENIZER = os.path.join(ROOT, "..", "shared", "fixtures",
                                "llama2-tokenizer")


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
  """name -> (checkpoint dir, transformers model), built once per session."""
  cache = {}

  def get(name):
    if name not in cache:
      directory = tmp_path_factory.mktemp(f"hf_{name}")
      configs = {**hf_models.TINY_CONFIGS, **hf_models.FAMILY_CONFIGS}
      model = hf_models.save_hf_llama(directory, configs[name])
      cache[name] = (directory, model)
    return cache[name]
  return get


def _mount_tmpfs(directory, options: str) -> bool:
  """A tmpfs at `directory` (root only; not every container allows it)."""
  if os.geteuid() != 0:
    return False
  return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs",
                         str(directory)], capture_output=True).returncode == 0


def _unmount(directory):
  subprocess.run(["umount", "-l", str(directory)], capture_output=True)


@pytest.fixture
def small_fs(tmp_path):
  """small_fs(bytes) -> an empty directory on a file system of that size
  (a tmpfs mount); skips where this machine cannot mount one (not root)."""
  mounted = []

  def make(size: int):
    directory = tmp_path / f"fs{len(mounted)}"
    directory.mkdir()
    if not _mount_tmpfs(directory, f"size={size}"):
      pytest.skip("cannot mount a small file system here (needs root)")
    mounted.append(directory)
    return directory
  yield make
  for directory in mounted:
    _unmount(directory)


@pytest.fixture
def read_only_dir(tmp_path):
  """An empty directory no process here can write: a read-only tmpfs where
  mounts are allowed (root ignores permission bits), else mode 0555."""
  directory = tmp_path / "read_only"
  directory.mkdir()
  if _mount_tmpfs(directory, "ro,size=64k"):
    yield directory
    _unmount(directory)
  elif os.geteuid() != 0:
    directory.chmod(0o555)
    yield directory
    directory.chmod(0o755)
  else:
    pytest.skip("root here, and no read-only mount can be made")


# Runs each command of a JSON {name: [module, args]} on stdin in this one
# process, as `python -m module args` would (`cli.run`: a user error is one
# line and exit 2), and prints {name: [exit code, stderr]}.
_RUNNER = """
import contextlib, importlib, io, json, sys, traceback
from longlora_jax.core import cli
results = {}
for name, (module, args) in json.load(sys.stdin).items():
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    try:
      cli.run(lambda: importlib.import_module(module).main(args))
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
      traceback.print_exc()
      code = 1
  results[name] = [code, err.getvalue()]
print(json.dumps(results))
"""


def run_commands(commands: dict) -> dict:
  """{name: (module, args)} -> {name: (exit code, stderr)}: each `python -m
  module args` from the repository root, one after another in one fresh
  process (each would otherwise pay for importing JAX and the model)."""
  proc = subprocess.run(
      [sys.executable, "-c", _RUNNER], cwd=ROOT, text=True,
      input=json.dumps(commands), capture_output=True, timeout=900,
      env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT})
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.splitlines()[-1])
  return {name: tuple(result) for name, result in results.items()}


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
