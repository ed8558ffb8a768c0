"""Reading and writing models and files: Hugging Face checkpoints
(`Checkpoint`, `load_hf`, `save_hf`), PEFT adapters, atomic output files,
the lock of a run directory."""

from longlora_jax import _lazy

__getattr__, __dir__ = _lazy.exports(__name__, {
    "Checkpoint": "checkpoint",
    "load_hf": "checkpoint",
    "save_hf": "hf",
    "resolve_checkpoint": "hub",
    "load_peft": "peft",
    "save_peft": "peft",
    "write_json": "files",
}, submodules=("checkpoint", "files", "hf", "hub", "lock", "peft",
               "peft_format", "weights"))
