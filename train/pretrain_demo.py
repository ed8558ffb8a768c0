"""Pretrains the demo base model (a tiny byte-level Llama) from scratch.

  python -m train.pretrain_demo              # writes the built-in `demo` checkpoint

Trains `longlora_jax.demo.base.DEMO_CONFIG` at its native context (256 tokens)
on the training split of the Python standard library's source, with the
training engine of `longlora_jax.training` (full fine-tuning of every
weight, full attention, AdamW with cosine decay), and saves it in Hugging
Face format
with the byte-level tokenizer. Deterministic on a given machine and Python;
18 minutes on 2 CPU cores (measured).
"""

import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from longlora_jax.core import cli
from longlora_jax.attention.dispatch import AttentionSpec
from longlora_jax.data.text import batches, document_tokens, packed_rows, prefetch
from longlora_jax.demo.base import DEMO_CONFIG, save_byte_tokenizer
from longlora_jax.demo.stdlib import DATA_DIR, demo_data
from longlora_jax.core.files import check_writable
from longlora_jax.checkpoints.hf import save_hf
from longlora_jax.checkpoints.hub import BUILTIN
from longlora_jax.model.llama import init_params
from longlora_jax.parallel.sharding import make_mesh
from longlora_jax.training.recipe import TrainConfig
from longlora_jax.training.step import (initial_state, jit_train_step,
                                        params_of)


def parse_args(argv=None):
  p = cli.Parser(__doc__)
  p.add_argument("--out", type=Path, default=BUILTIN["demo"],
                 help="the model directory to write")
  p.add_argument("--data-dir", type=Path, default=DATA_DIR,
                 help="where the standard library's split is written")
  p.add_argument("--steps", type=cli.count, default=3000)
  p.add_argument("--batch", type=cli.count, default=16, help="rows per step")
  p.add_argument("--lr", type=cli.positive, default=3e-3)
  p.add_argument("--seed", type=cli.index, default=0)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  check_writable(args.out)
  from transformers import AutoTokenizer
  config = DEMO_CONFIG
  ctx = config.max_position_embeddings
  train_file, _ = demo_data(args.data_dir, seed=args.seed)
  with tempfile.TemporaryDirectory() as tok_dir:
    save_byte_tokenizer(Path(tok_dir))
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    docs = document_tokens(str(train_file), tokenizer,
                           eos_id=config.eos_token_id)
    data = prefetch(batches(packed_rows(docs, ctx, seed=args.seed,
                                        source=str(train_file)),
                            (1, args.batch)))
    tc = TrainConfig(attention=AttentionSpec("full", implementation="dense"),
                     remat="none", dtype="float32", accum=1, lr=args.lr,
                     warmup=100, schedule="cosine", steps=args.steps,
                     beta2=0.95, weight_decay=0.1, loss_chunk=ctx)
    state = initial_state(init_params(config, jax.random.key(args.seed)), tc,
                          mode="full")
    mesh = make_mesh("fsdp=-1")
    first, _ = next(data)
    step, s_shard, b_shard = jit_train_step(
        config, tc, mesh, state, {"input_ids": first.astype(np.int32)})
    state = jax.device_put(state, s_shard)
    bar = tqdm(range(args.steps), desc="pretrain", unit="step")
    batch, start = first, time.time()
    for i in bar:
      if i:
        batch, _ = next(data)
      state, metrics = step(state, jax.device_put(
          {"input_ids": batch.astype(np.int32)}, b_shard))
      if i % 50 == 0 or i == args.steps - 1:
        bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
    data.close()
    print(f"pretrained {args.steps} steps in {time.time() - start:.0f}s, "
          f"last loss {float(metrics['loss']):.3f}")
    out = save_hf(config, params_of(state), args.out,
                  tokenizer_from=tok_dir, dtype="bfloat16", overwrite=True)
  print(f"wrote {out}")


if __name__ == "__main__":
  cli.run(main)
