"""The built-in demo's evaluation: perplexity and passkey retrieval of the
base model, the base model with position interpolation but no training, and
the extended model (the table `python -m train.extend` ends with)."""

import os
from pathlib import Path

import numpy as np

from longlora_jax.checkpoints.checkpoint import Checkpoint
from longlora_jax.core.files import write_json
from longlora_jax.data.text import document_tokens
from longlora_jax.demo.stdlib import demo_data
from longlora_jax.evaluation.passkey import passkey_filler, retrieval
from longlora_jax.evaluation.perplexity import evaluate


def stream_tokens(source: str | os.PathLike, tokenizer,
                  eos_id: int) -> np.ndarray:
  """The documents of `source` tokenised end to end, each followed by
  `eos_id`: the stream the perplexity windows are cut from."""
  docs = document_tokens(str(source), tokenizer, eos_id=eos_id)
  return np.concatenate([ids for _, ids in docs(0)])


def report(ctx: int, extended_dir: str | os.PathLike, *, windows: int = 24,
           trials: int = 20) -> dict:
  """Perplexity at the native and extended context, and passkey accuracy
  near both lengths, of the base model, the base model with position
  interpolation but no training, and the extended model `extended_dir`.

  Perplexity is the official protocol (`longlora_jax.evaluation.perplexity`,
  windows 256 tokens apart, `windows` of them evenly spaced) on the held-out
  files.
  """

  base, extended = Checkpoint.open("demo"), Checkpoint.open(extended_dir)
  config, params = base.config, base.params("float32")
  ext_config, ext_params = extended.config, extended.params("float32")
  tokenizer = extended.tokenizer
  heldout = demo_data()[1]
  tokens = stream_tokens(heldout, tokenizer, config.eos_token_id)
  native = config.max_position_embeddings
  factor = ext_config.rope_factor
  models = [("base model, no interpolation", config, params),
            (f"base + PI x{factor:g}, no fine-tuning", config.with_context(ctx),
             params),
            (f"extended (LongLoRA, {Path(extended_dir).name})", ext_config,
             ext_params)]
  fillers = [passkey_filler(tokenizer, native + 16),
             passkey_filler(tokenizer, ctx - 16)]
  rows = []
  for name, c, p in models:
    row = {"model": name, "rope_factor": c.rope_factor}
    for length in (native, ctx):
      row[f"ppl@{length}"] = evaluate(
          c, p, tokens, length, max_windows=windows, batch_size=8,
          attention="full")["perplexity"]
    for i, n_filler in enumerate(fillers):
      correct, prompt = retrieval(c, p, tokenizer, n_filler, trials)
      row[f"passkey{i}"] = {"accuracy": correct / trials,
                            "prompt_tokens": prompt}
    rows.append(row)
  return {"native": native, "ctx": ctx, "heldout": str(heldout),
          "heldout_tokens": int(len(tokens)), "windows": windows,
          "trials": trials, "rows": rows}


def format_report(r: dict) -> str:
  """The report as a table."""
  p0, p1 = (r["rows"][0][f"passkey{i}"]["prompt_tokens"] for i in (0, 1))
  head = (f"{'model':<36} {'ppl@' + str(r['native']):>9} "
          f"{'ppl@' + str(r['ctx']):>9} {'passkey@~' + str(p0):>13} "
          f"{'passkey@~' + str(p1):>14}")
  lines = [head, "-" * len(head)]
  for row in r["rows"]:
    lines.append(
        f"{row['model']:<36} {row['ppl@' + str(r['native'])]:>9.3f} "
        f"{row['ppl@' + str(r['ctx'])]:>9.3f} "
        f"{row['passkey0']['accuracy']:>13.0%} "
        f"{row['passkey1']['accuracy']:>14.0%}")
  lines.append(
      f"perplexity: official protocol, {r['windows']} windows per length over "
      f"{r['heldout_tokens']:,} held-out tokens (standard-library files never "
      f"trained on); passkey: official prompts, {r['trials']} trials, filler "
      "sized for this byte-level tokenizer so prompts land just above the "
      "native context and just below the extended one")
  return "\n".join(lines)


def save_report(run_dir: str | os.PathLike, ctx: int,
                extended_dir: str | os.PathLike) -> str:
  """The report of a demo run extended to `ctx` tokens, written to
  run_dir/report.json; the table and where it went."""
  r = report(ctx, extended_dir)
  file = write_json(Path(run_dir) / "report.json", r)
  return f"{format_report(r)}\nwrote {file}"
