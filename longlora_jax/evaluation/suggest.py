"""The evaluation commands to run on a trained model, as the training
commands print them at their end: for a model extended to a longer context,
perplexity at its native and trained lengths, passkey retrieval and RULER up
to the trained length; for an instruction-tuned one, a question about a long
document."""

import os

from longlora_jax.evaluation.passkey import default_protocol

# The official protocol's shortest prompt with filler (its lengths round
# down to 1024 characters of filler, 3.75 characters a token).
OFFICIAL_MIN_INTERVAL = 274


def ruler_lengths(native: int, ctx: int) -> list[int]:
  """RULER's lengths for a model extended from `native` to `ctx` tokens:
  the native length doubled up to the trained one, which ends the list."""
  lengths = [native]
  while lengths[-1] * 2 < ctx:
    lengths.append(lengths[-1] * 2)
  return lengths + [ctx] if ctx > native else lengths


def passkey_interval(tokenizer, ctx: int) -> int:
  """eval.passkey's --interval up to `ctx` tokens with `tokenizer`:
  quarters of the context where prompt lengths are measured; eighths, and
  no fewer than the official protocol's shortest, where its lengths are
  (they land below the asked ones)."""
  if default_protocol(tokenizer) == "official":
    return max(ctx // 8, OFFICIAL_MIN_INTERVAL)
  return ctx // 4


def _long_context(model, *, tokenizer, data, native, ctx) -> list[str]:
  lengths = " ".join(map(str, ruler_lengths(native, ctx)))
  return [f"python -m eval.perplexity --ckpt {model} --data {data} "
          f"--seq-len {native} {ctx}",
          f"python -m eval.passkey --ckpt {model} --max-tokens {ctx} "
          f"--interval {passkey_interval(tokenizer, ctx)}",
          f"python -m eval.ruler --ckpt {model} --lengths {lengths}"]


def _chat(model, **_) -> list[str]:
  return [f"python -m eval.chat --ckpt {model} --material FILE.txt "
          "--question \"...\""]


# The kind of model a training task makes -> (what to do with it, how).
KINDS = {"long-context": ("evaluate the merged model", _long_context),
         "chat": ("ask the merged model about a long document", _chat)}


def commands(kind: str, model: str | os.PathLike, *, tokenizer, data: str,
             native: int, ctx: int) -> str:
  """The commands that evaluate `model`, a model of `kind` (a key of
  KINDS) trained at `ctx` tokens on `data` from a model of `native` tokens
  with `tokenizer`."""
  what, lines = KINDS[kind]
  return f"{what} with:\n" + "\n".join(
      f"  {line}" for line in lines(model, tokenizer=tokenizer, data=data,
                                     native=native, ctx=ctx))
