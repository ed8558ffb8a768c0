"""The package installs as a wheel with its data, runs from anywhere, and
declares the runtime that requirements.txt installs."""

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("wheel")
  build = subprocess.run(
      [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
       str(ROOT)], capture_output=True, text=True, timeout=600)
  assert build.returncode == 0, build.stderr[-2000:]
  (path,) = out.glob("longlora_jax-*.whl")
  return path


def _requirement_names(lines) -> set[str]:
  names = set()
  for line in lines:
    line = line.split("#")[0].strip()
    if line and not line.startswith("-"):
      names.add(re.match(r"[A-Za-z0-9_.\-]+", line).group(0).lower()
                .replace("_", "-"))
  return names


def test_the_wheel_holds_every_package_and_the_builtin_checkpoint(wheel):
  files = set(zipfile.ZipFile(wheel).namelist())
  packages = {p.parent.relative_to(ROOT).as_posix() + "/__init__.py"
              for p in (ROOT / "longlora_jax").rglob("__init__.py")}
  assert packages <= files
  builtin = ROOT / "longlora_jax" / "checkpoints" / "builtin"
  assert {p.relative_to(ROOT).as_posix() for p in builtin.rglob("*")
          if p.is_file()} <= files


def test_the_wheel_declares_what_requirements_txt_installs(wheel):
  with zipfile.ZipFile(wheel) as z:
    (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
    declared = [line.split(":", 1)[1] for line in
                z.read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
  wanted = _requirement_names((ROOT / "requirements.txt").read_text()
                              .splitlines())
  assert _requirement_names(declared) == wanted


def test_installed_elsewhere_it_opens_the_demo(wheel, tmp_path):
  site = tmp_path / "site"
  install = subprocess.run(
      [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
       str(site), str(wheel)], capture_output=True, text=True, timeout=600)
  assert install.returncode == 0, install.stderr[-2000:]
  code = ("import longlora_jax as ll; c = ll.Checkpoint.open('demo'); "
          "print(c.directory); print(c.config.num_hidden_layers)")
  env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  directory, layers = out.stdout.split()
  assert Path(directory).is_relative_to(site)  # not the source checkout
  assert layers == "4"
