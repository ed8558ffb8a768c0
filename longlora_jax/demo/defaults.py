"""What `python -m train.extend` does with no arguments: the built-in demo
checkpoint's defaults, extending it to 1024 tokens on the standard
library's source (`longlora_jax.demo.stdlib`) into runs/demo/extend."""

from pathlib import Path

from longlora_jax.demo import stdlib
from longlora_jax.training.options import CheckpointDefaults


def _training_split() -> str:
  return str(stdlib.demo_data()[0])


# The demo's recipe where it differs from the official one: a 1M-parameter
# byte-level model adapts to PI in a few hundred steps at a higher learning
# rate; float32 because CPUs have no fast bfloat16.
EXTEND = CheckpointDefaults(
    ckpt="demo",
    options=dict(ctx=1024, steps=200, batch=8, accum=1, lr=2e-3,
                 dtype="float32", remat="none"),
    out=Path("runs") / "demo" / "extend", data=_training_split,
    data_help="the Python standard library's source")
