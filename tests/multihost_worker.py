"""One process of the multi-process tests (run by tests/test_distributed.py).

`train OUT`: trains one step of a tiny model on a fixed global batch and, on
process 0, writes the loss and the updated trainable parameters to OUT.
`load CKPT OUT`: loads CKPT sharded over fsdp=-1 and writes to OUT.<process>
the bytes this process read and its shards next to the file's values.
"""

import dataclasses
import json
import sys

from longlora_jax.parallel.distributed import global_batch, initialize_from_env, process_slice

initialize_from_env()  # Before anything touches a device.

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from longlora_jax import LlamaConfig, init_params  # noqa: E402
from longlora_jax.model import lora  # noqa: E402
from longlora_jax.parallel.sharding import make_mesh  # noqa: E402
from longlora_jax.attention.dispatch import AttentionSpec  # noqa: E402
from longlora_jax.training.recipe import TrainConfig  # noqa: E402
from longlora_jax.training.step import init_state, jit_train_step  # noqa: E402

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4,
                  initializer_range=0.2)
TC = TrainConfig(attention=AttentionSpec("s2"), dtype="float32", lr=1e-2,
                 warmup=0, eps=1e-3, loss_chunk=8)


def main(out_file):
  params = lora.add_lora(init_params(CFG, jax.random.key(0)), key=jax.random.key(1))
  state = init_state(params, lora.trainable_mask(params), TC)
  rows = 8
  ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (1, rows, 32))
  mesh = make_mesh("data=2,fsdp=-1")
  step, s_shard, b_shard = jit_train_step(
      CFG, TC, mesh, state, {"input_ids": jax.ShapeDtypeStruct(ids.shape, np.int32)})
  state = jax.device_put(state, s_shard)
  local = {"input_ids": ids[:, process_slice(rows)].astype(np.int32)}
  batch = global_batch(local, b_shard, rows)
  state, metrics = step(state, batch)
  trainable = multihost_utils.process_allgather(state.trainable, tiled=True)
  if jax.process_index() == 0:
    leaves = {jax.tree_util.keystr(p): np.asarray(x) for p, x in
              jax.tree_util.tree_flatten_with_path(trainable)[0]}
    np.savez(out_file, loss=np.asarray(metrics["loss"]),
             processes=jax.process_count(), devices=jax.device_count(), **leaves)


def load(directory, out_file):
  from safetensors.numpy import load_file
  from longlora_jax.checkpoints import hf as hf_io
  from longlora_jax.checkpoints.checkpoint import Checkpoint, param_shardings
  read = []
  open_weights = hf_io.open_weights

  def counting(directory):
    weights = open_weights(directory)
    return dataclasses.replace(weights, read=lambda name, index=...: (
        read.append((part := weights.read(name, index)).nbytes) or part))
  hf_io.open_weights = counting
  checkpoint = Checkpoint.open(directory)
  params = checkpoint.params("float32", param_shardings(
      checkpoint.config, make_mesh("fsdp=-1")))
  # Each local shard against the same slice of the file, read by NumPy.
  want = load_file(f"{directory}/model.safetensors")
  kernel = params["layers"]["self_attn"]["q_proj"]["kernel"]
  for shard in kernel.addressable_shards:
    layers, rows, cols = shard.index
    full = np.stack([want[f"model.layers.{i}.self_attn.q_proj.weight"].T
                     for i in range(CFG.num_hidden_layers)])
    np.testing.assert_array_equal(shard.data, full[layers, rows, cols])
  with open(f"{out_file}.{jax.process_index()}", "w") as f:
    json.dump({"read": sum(read), "reads": len(read),
               "devices": jax.local_device_count()}, f)


if __name__ == "__main__":
  if sys.argv[1] == "load":
    load(*sys.argv[2:])
  else:
    main(sys.argv[2])
