import os

# Tests run on the CPU with 8 virtual devices so sharding code is exercised
# everywhere; set before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
