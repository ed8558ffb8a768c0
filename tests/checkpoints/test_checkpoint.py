import dataclasses
import json

import numpy as np
import pytest
from flax import traverse_util

from longlora_jax.checkpoints import hf as hf_io
from longlora_jax.checkpoints.checkpoint import (Checkpoint, load_model,
                                                 model_config, param_shardings)
from longlora_jax.checkpoints.hub import resolve_checkpoint
from longlora_jax.core.errors import CheckpointError
from longlora_jax.parallel.sharding import make_mesh


@pytest.mark.parametrize("mesh", ["fsdp=8", "fsdp=4,tensor=2"])
def test_loads_straight_into_the_planned_shards(tiny_hf, monkeypatch, mesh):
  directory, model = tiny_hf("gqa")  # every axis but layers divisible by 8
  reads = []  # (tensor name, bytes of one read)
  open_weights = hf_io.open_weights

  def counting(directory):
    weights = open_weights(directory)
    read = lambda name, index=...: reads.append(
        (name, (part := weights.read(name, index)).nbytes)) or part
    return dataclasses.replace(weights, read=read)
  monkeypatch.setattr(hf_io, "open_weights", counting)
  checkpoint = Checkpoint.open(directory)
  mesh = make_mesh(mesh)
  shardings = param_shardings(checkpoint.config, mesh)
  params = checkpoint.params("float32", shardings)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  planned = traverse_util.flatten_dict(shardings)
  for path, value in traverse_util.flatten_dict(params).items():
    sharding = planned[path]
    assert value.sharding == sharding, path
    # Each device holds its part: 1/8 of a tensor split over both axes,
    # 1/4 of one split over fsdp=4 alone, etc.
    parts = int(np.prod([mesh.shape[a] for a in sharding.spec if a]))
    assert parts > 1, path  # nothing here is left replicated
    for shard in value.addressable_shards:
      assert shard.data.nbytes * parts == value.nbytes, path
    # No read was ever larger than one device's part of one layer, so no
    # tensor (let alone a stacked one) was ever whole anywhere.
    layers = value.shape[0] if path[0] == "layers" else 1
    biggest = max(n for name, n in reads
                  if name in {hf_io.hf_name(path, i if layers > 1 else None)
                              for i in range(layers)})
    assert biggest * parts * layers == value.nbytes, path
    # The values are the transformers model's, exactly.
    names = [hf_io.hf_name(path, i) for i in range(layers)] if (
        path[0] == "layers") else [hf_io.hf_name(path)]
    want = np.stack([state[n].T if path[-1] == "kernel" else state[n]
                     for n in names]) if path[0] == "layers" else (
        state[names[0]].T if path[-1] == "kernel" else state[names[0]])
    np.testing.assert_array_equal(np.asarray(value), want, err_msg=str(path))


@pytest.mark.parametrize("ctx,pi_factor,factor", [
    (None, None, 1.0), (1024, None, 4.0), (1000, None, 4.0), (None, 6, 6.0),
    (1024, 1, 1.0)])
def test_load_model_sets_the_rope_factor_from_ctx_or_pi_factor(
    ctx, pi_factor, factor):
  model = load_model("demo", "float32", "fsdp=4,tensor=2", ctx=ctx,
                     pi_factor=pi_factor)
  # The demo model's native context is 256: ceil(ctx / 256); --pi-factor
  # wins over --ctx, and 1 means no scaling.
  assert model.config.rope_factor == factor
  assert (model.config.rope_scaling is None) == (factor == 1.0)
  assert model.directory == resolve_checkpoint("demo")
  # Every weight read into its shards on the mesh asked for, in float32.
  for leaf in traverse_util.flatten_dict(model.params).values():
    assert dict(leaf.sharding.mesh.shape) == {
        "data": 1, "fsdp": 4, "tensor": 2, "context": 1}
    assert leaf.dtype == np.float32


def test_model_config_reads_a_preset_a_config_file_or_a_checkpoint(tmp_path):
  # Llama 2 7B as Meta's paper and its config.json give it.
  llama = model_config("llama2-7b")
  assert (llama.hidden_size, llama.intermediate_size, llama.num_hidden_layers,
          llama.num_attention_heads, llama.vocab_size) == (
              4096, 11008, 32, 32, 32000)
  file = tmp_path / "config.json"
  file.write_text(json.dumps({
      "model_type": "llama", "vocab_size": 300, "hidden_size": 48,
      "intermediate_size": 96, "num_hidden_layers": 3,
      "num_attention_heads": 6, "num_key_value_heads": 2,
      "max_position_embeddings": 128}))
  for given in (file, str(file)):
    mine = model_config(given)
    assert (mine.hidden_size, mine.num_hidden_layers,
            mine.num_key_value_heads, mine.context) == (48, 3, 2, 128)
  assert model_config("demo").context == 256  # a checkpoint: the demo's
  with pytest.raises(CheckpointError):
    model_config(str(tmp_path / "missing"))
