"""Device meshes and sharding rules (`make_mesh`, activation and
parameter specs) and multi-host start-up."""

from longlora_jax.core import lazy as _lazy

__getattr__, __dir__ = _lazy.exports(__name__, {
    "make_mesh": "sharding",
}, submodules=("sharding", "distributed"))
