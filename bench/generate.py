"""Generation benchmark: prefill and decode tokens/s at long prompts.

Random weights of a given shape (speed does not depend on their values):
a prompt of each length is prefilled in chunks over the KV cache, then
`--decode` tokens are generated one by one. Compilation is excluded (each
shape runs once untimed first). On a GPU each row also gives the device's
peak memory so far (the process's running maximum).

  python -m bench.generate --model llama2-7b --prompts 4096 16384 32768
  python -m bench.generate --hidden 512 --layers 8 --heads 8   # CPU-sized
"""

import dataclasses
import datetime
import time
from pathlib import Path

from bench import timing
from longlora_jax.core import cli


def parse_args(argv=None):
  p = cli.Parser(__doc__)
  cli.option(p, "--model", default=None,
             purpose="default: the --hidden etc. shape")
  p.add_argument("--hidden", type=cli.count, default=512)
  p.add_argument("--layers", type=cli.count, default=8)
  cli.option(p, "--heads", default=8)
  cli.option(p, "--kv-heads")
  p.add_argument("--vocab", type=cli.count, default=32000)
  p.add_argument("--prompts", type=cli.count, nargs="+",
                 default=[4096, 16384, 32768], help="prompt lengths")
  p.add_argument("--decode", type=cli.count, default=32,
                 help="new tokens per prompt")
  p.add_argument("--chunk", type=cli.count, default=2048,
                 help="prefill chunk")
  cli.option(p, "--dtype", default=None, choices=("float32", "bfloat16"),
             help="weights and compute (default: bfloat16 on GPU, float32 "
                  "on CPU)")
  p.add_argument("--json", metavar="OUT", type=Path)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.json:
    from longlora_jax.core.files import check_writable
    check_writable(args.json.parent)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from longlora_jax.checkpoints.checkpoint import model_config
  from longlora_jax.model.config import LlamaConfig
  from longlora_jax.model.generation import generate
  from longlora_jax.model.llama import init_params

  platform = jax.devices()[0].platform
  dtype = args.dtype or ("float32" if platform == "cpu" else "bfloat16")
  if args.model:
    config = model_config(args.model)
  else:
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads)
  config = dataclasses.replace(config, eos_token_id=None).with_context(
      max(args.prompts) + args.decode)
  params = jax.jit(lambda k: init_params(config, k, dtype=jnp.dtype(dtype)))(
      jax.random.key(0))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  rows = []
  for prompt in args.prompts:
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, prompt))
    times = []  # when each new token reached the host
    run = lambda n: generate(config, params, ids, max_new_tokens=n,
                             chunk_size=args.chunk,
                             on_token=lambda _: times.append(
                                 time.perf_counter()))
    run(2)  # compile prefill and decode
    times.clear()
    t0 = time.perf_counter()
    run(args.decode + 1)
    # The first token ends the prefill; the others are one decode step each.
    prefill_s, decode_s = times[0] - t0, times[-1] - times[0]
    peak = timing.peak_bytes()
    rows.append({"prompt": prompt, "prefill_s": prefill_s,
                 "prefill_tok_s": prompt / prefill_s,
                 "decode_tok_s": args.decode / decode_s,
                 "peak_gib": None if peak is None else peak / 2**30})
    print(f"prompt {prompt:>6}: prefill {prompt / prefill_s:9.0f} tok/s "
          f"({prefill_s:.2f} s), decode {args.decode / decode_s:7.2f} tok/s"
          + ("" if peak is None else f", peak {peak / 2**30:.2f} GiB"),
          flush=True)
  result = {
      "date": datetime.date.today().isoformat(), "jax": jax.__version__,
      "device": jax.devices()[0].device_kind, "platform": platform,
      "dtype": dtype, "params": n_params,
      "config": dataclasses.asdict(config), "chunk": args.chunk,
      "decode_tokens": args.decode, "results": rows,
  }
  if args.json:
    from longlora_jax.core.files import write_json
    write_json(args.json, result)
  return 0


if __name__ == "__main__":
  cli.run(main)
