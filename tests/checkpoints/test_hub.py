import json

import pytest

from longlora_jax import LongLoraError
from longlora_jax.checkpoints import hub


def test_demo_resolves_to_the_package_data():
  directory = hub.resolve_checkpoint("demo")
  # Read in place from the package data.
  assert directory == hub.BUILTIN["demo"]
  assert json.loads((directory / "config.json").read_text())["vocab_size"] == 259


def test_missing_asset_names_the_rebuild_command(tmp_path, monkeypatch):
  monkeypatch.setitem(hub.BUILTIN, "demo", tmp_path / "nothing")
  with pytest.raises(LongLoraError, match="python -m train.pretrain_demo"):
    hub.resolve_checkpoint("demo")
