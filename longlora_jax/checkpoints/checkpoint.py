"""Opening a checkpoint: its location resolved once, then its config,
tokenizer and parameters from the one object every command uses."""

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from longlora_jax.model.config import PRESETS, LlamaConfig, RopeScaling, preset
from longlora_jax.parallel.sharding import make_mesh, shardings_like
from longlora_jax.checkpoints.hf import expected_shapes, read_params
from longlora_jax.checkpoints.bnb import checkpoint_quantization
from longlora_jax.checkpoints.hub import resolve_checkpoint
from longlora_jax.checkpoints.quantized import check_quantize
from longlora_jax.core.errors import CheckpointError
from longlora_jax.core.files import read_json
from longlora_jax.checkpoints import meta
from longlora_jax.checkpoints.tokenizer import load_tokenizer


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A Hugging Face Llama checkpoint: `Checkpoint.open(...)`.

  name: as given (`hf:ORG/NAME[@revision]`, a directory, or `demo`);
  directory: where its files are; config: its config.json (or, in Meta's
  layout, params.json); note: what a Meta-layout checkpoint's files did not
  say and how it was decided (`meta.read_config`), for commands to print;
  quantized: "nf4" for a bitsandbytes 4-bit checkpoint, whose layer
  kernels load as the 4-bit blocks they are.
  """
  name: str
  directory: Path
  config: LlamaConfig
  note: str | None = None
  quantized: str | None = None

  @classmethod
  def open(cls, name: str | os.PathLike,
           original_context: int | None = None) -> "Checkpoint":
    """Resolves `name` (a directory, `hf:ORG/NAME[@revision]` through the
    Hugging Face cache, or `demo`, the built-in tiny model) and reads its
    config; a directory in Meta's layout (or with it under `original/`)
    too, its original context decided from its files unless
    `original_context` is given. Raises CheckpointError with the fix when
    it cannot."""
    name = str(name)
    directory = resolve_checkpoint(name)
    if (folder := meta.locate(directory)) is not None:
      return cls(name, folder, *meta.read_config(folder, original_context))
    config = LlamaConfig.from_pretrained(directory)
    file = directory / "config.json"
    quantized = checkpoint_quantization(
        read_json(file, missing=f"{file}: not found", error=CheckpointError),
        str(file))
    return cls(name, directory, config, quantized=quantized)

  def params(self, dtype=jnp.bfloat16, shardings=None,
             quantize: str | None = None):
    """The weights as our parameter tree, in `dtype`; `shardings` (a tree
    like the parameters, e.g. `param_shardings(config, mesh)`) places each
    device's part as it is read, and no whole tensor on any one device.
    `quantize="nf4"`: the layer kernels in 4 bits, each quantized as it is
    read (`quantized.place_nf4`); a 4-bit checkpoint's always are."""
    if meta.is_meta(self.directory):
      if check_quantize(quantize):
        raise CheckpointError(
            f"{self.name}: 4-bit weights are read from Hugging Face "
            "checkpoints, not Meta's layout; use the model's Hugging Face "
            "release, or --quantize none")
      return meta.read_params(self.directory, self.config, dtype, shardings)
    return read_params(self.directory, self.config, dtype, shardings,
                       quantize)

  @functools.cached_property
  def tokenizer(self):
    """Its tokenizer (`load_tokenizer`)."""
    return load_tokenizer(self.directory)

  @property
  def eos_id(self) -> int:
    """The end-of-document token: the tokenizer's, else the config's."""
    eos = self.tokenizer.eos_token_id
    return int(np.atleast_1d(self.config.eos_token_id)[0]) if eos is None \
        else eos


def model_config(model: str | os.PathLike) -> LlamaConfig:
  """The config `model` names, as the planning and benchmark commands take
  it: a preset name (`model.config.PRESETS`), a config.json file, or a
  checkpoint as `Checkpoint.open` takes it (a HF or Meta-layout directory,
  hf:ORG/NAME from the cache, demo)."""
  model = str(model)
  if model in PRESETS:
    return preset(model)
  if Path(model).is_file():
    return LlamaConfig.from_pretrained(model)
  return Checkpoint.open(model).config


def load_hf(path_or_id: str | os.PathLike, dtype=jnp.bfloat16):
  """`(LlamaConfig, params)` of a HF Llama checkpoint: a local directory or
  `hf:ORG/NAME[@rev]`; `dtype` bfloat16, float16 or float32 (or their
  names). Raises CheckpointError when it is missing, malformed or not a
  Llama."""
  checkpoint = Checkpoint.open(path_or_id)
  return checkpoint.config, checkpoint.params(dtype)


class Model(NamedTuple):
  """A checkpoint loaded for inference (`load_model`)."""
  config: LlamaConfig
  params: Any
  tokenizer: Any
  directory: Path


def load_model(ckpt: str | os.PathLike, dtype="bfloat16", mesh="fsdp=-1", *,
               ctx: int | None = None, pi_factor: float | None = None,
               original_context: int | None = None,
               quantize: str | None = None) -> Model:
  """A checkpoint as the evaluation commands use it: its weights read
  straight into their shards on `mesh` (a `make_mesh` spec such as
  "fsdp=8", or a Mesh), so no device holds the whole model.

  The RoPE scaling: `pi_factor` forces linear interpolation by that factor
  (1: none); else `ctx`, the context the model was fine-tuned to, sets
  ceil(ctx / original context) when the config has no scaling of its own.
  `original_context`: that of a checkpoint in Meta's layout, where its
  files do not say it (`Checkpoint.open`). `quantize`: "nf4" for 4-bit
  layer kernels (`Checkpoint.params`).
  """
  checkpoint = Checkpoint.open(ckpt, original_context)
  config = checkpoint.config
  if pi_factor is not None:
    config = dataclasses.replace(
        config, rope_scaling=RopeScaling(pi_factor) if pi_factor > 1 else None)
  elif ctx and config.rope_scaling is None:
    config = config.with_context(ctx)
  if isinstance(mesh, str):
    mesh = make_mesh(mesh)
  params = checkpoint.params(dtype, param_shardings(checkpoint.config, mesh),
                             quantize)
  return Model(config, params, checkpoint.tokenizer, checkpoint.directory)



def param_shardings(config: LlamaConfig, mesh):
  """The parameters' shardings on `mesh` by the sharding rules
  (`sharding.param_spec`), from their shapes alone: decided before any byte
  is read, and the same as a train state's for its frozen weights."""
  return shardings_like(traverse_util.unflatten_dict({
      path: jax.ShapeDtypeStruct(shape, jnp.float32)
      for path, shape in expected_shapes(config).items()}), mesh)
