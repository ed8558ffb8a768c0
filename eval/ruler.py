"""RULER's synthetic tasks (needles, variable tracking, word extraction) per
length, offline, with heatmaps.

  python -m eval.ruler --ckpt DIR --lengths 4k 8k 16k 32k --samples 25
  python -m eval.ruler --ckpt runs/demo/extend/hf --lengths 512 1024

Writes OUT/ruler.json (scores per task and length), OUT/samples/TASK-LENGTH
.json (every prompt's answers and prediction; a rerun with the same
settings reuses them), OUT/scores.png (task x length) and OUT/depth.png
(needle depth x length, single-needle tasks).
"""

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from longlora_jax.checkpoints.checkpoint import load_model
from longlora_jax.core import cli
from longlora_jax.evaluation.ruler import suite as ruler
from longlora_jax.evaluation.ruler import sources as rs
from longlora_jax.evaluation.ruler import tasks as rt
from longlora_jax.core.files import check_writable, write_json
from longlora_jax.core.plots import save_heatmap


def parse_args(argv=None):
  p = cli.Parser(__doc__)
  cli.model_options(p)
  p.add_argument("--lengths", nargs="+", default=[4096, 8192, 16384, 32768],
                 type=cli.integer(64, tokens=True),
                 help="prompt + generation lengths in tokens (4k = 4096)")
  p.add_argument("--tasks", nargs="+", default=list(rt.TASKS),
                 choices=list(rt.TASKS), metavar="TASK",
                 help=f"from: {' '.join(rt.TASKS)}")
  p.add_argument("--samples", type=cli.count, default=25,
                 help="prompts per task and length")
  p.add_argument("--seed", type=cli.index, default=42)
  p.add_argument("--depths", nargs="+", default=list(rt.DEFAULT_DEPTHS),
                 type=cli.real(0.0, 100.0),
                 help="needle depths in percent of the haystack")
  p.add_argument("--haystack", type=Path, default=None,
                 help="text FILE or DIR of .txt/.md files (default: the "
                      "standard library's pydoc reference text)")
  p.add_argument("--squad", type=Path, default=None,
                 help="SQuAD 2.0 dev JSON for qa_1 (skipped without)")
  p.add_argument("--hotpotqa", type=Path, default=None,
                 help="HotpotQA dev distractor JSON for qa_2 (skipped "
                      "without)")
  p.add_argument("--chat-template", choices=ruler.CHAT_TEMPLATES,
                 default="auto", help="auto: the tokenizer's, if any")
  p.add_argument("--batch-size", type=cli.count,
                 default=8, help="prompts generated together")
  p.add_argument("--chunk-size", type=cli.count,
                 default=2048, help="prefill tokens per step")
  p.add_argument("--out", type=Path, default=Path("runs/ruler"),
                 help="directory for the scores, samples and heatmaps")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  check_writable(args.out)
  lengths, depths = sorted(set(args.lengths)), sorted(set(args.depths))
  qa = {name: reader(path) for name, reader, path in (
      ("squad", rs.read_squad, args.squad),
      ("hotpotqa", rs.read_hotpotqa, args.hotpotqa)) if path}
  sources = rs.make_sources(rs.read_haystack(args.haystack), qa)
  config, params, tokenizer, directory = load_model(
      args.ckpt, args.dtype, args.mesh, ctx=args.ctx, pi_factor=args.pi_factor,
      original_context=args.original_ctx, quantize=args.quantize)
  chat = ruler.uses_chat(tokenizer, args.chat_template)
  settings = {"checkpoint": str(directory), "rope_factor": config.rope_factor,
              "dtype": args.dtype, "quantize": args.quantize,
              "seed": args.seed, "samples": args.samples,
              "depths": depths, "chat_template": chat,
              "batch_size": args.batch_size,  # it decides what is trimmed
              "haystack": str(args.haystack or "pydoc_data")}
  with tqdm(total=len(args.tasks) * len(lengths) * args.samples,
            desc="ruler", unit="prompt") as bar:
    result = ruler.suite(
        config, params, tokenizer, tasks=args.tasks, lengths=lengths,
        samples=args.samples, seed=args.seed, sources=sources, out=args.out,
        settings=settings, depths=depths, chat=chat,
        batch_size=args.batch_size, chunk_size=args.chunk_size,
        progress=bar.update, note=bar.write)
  scores = result["scores"]
  print(f"\nRULER (score %): {directory} (RoPE factor "
        f"{config.rope_factor:g}, chat template {'on' if chat else 'off'})")
  print(f"{'task':<17}" + "".join(f"{n:>8}" for n in lengths))
  for task, row in scores.items():
    print(f"{task:<17}" + "".join(
        f"{'-' if row.get(n) is None else format(row[n], '.1f'):>8}"
        for n in lengths))
  write_json(args.out / "ruler.json", {"settings": settings, "scores": {
      t: {str(n): s for n, s in row.items()} for t, row in scores.items()},
      "notes": result["notes"]})
  table = [[np.nan if scores[t].get(n) is None else scores[t][n]
            for n in lengths] for t in args.tasks]
  name = "/".join(Path(directory).parts[-2:])
  save_heatmap(args.out / "scores.png", table, rows=args.tasks,
               columns=lengths, xlabel="length (tokens)", ylabel="task",
               title=f"RULER: {name}")
  save_heatmap(args.out / "depth.png",
               ruler.depth_table(result["results"], lengths, depths),
               rows=[f"{d:g}%" for d in depths], columns=lengths,
               xlabel="length (tokens)", ylabel="needle depth",
               title=f"Needle in a haystack (niah_single_*): {name}")
  print(f"wrote {args.out / 'ruler.json'}, {args.out / 'scores.png'} and "
        f"{args.out / 'depth.png'}")


if __name__ == "__main__":
  cli.run(main)
