"""Long-document perplexity over fixed-length windows of a token stream.

Two protocols:
- "official" (LongLoRA's eval.py, from landmark-attention): a window of
  `seq_len` tokens starts every `stride` tokens (the last start dropped);
  each window's loss is the mean over its seq_len-1 next-token predictions;
  perplexity = exp(mean window loss).
- "sliding": windows every `stride` tokens, the first scored whole, each
  later one only on its last `stride` tokens, so every token is scored once
  with at least seq_len-stride tokens of context; perplexity =
  exp(total loss / scored tokens).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from longlora_jax.model.config import LlamaConfig
from longlora_jax.core.errors import LongLoraError
from longlora_jax.model.loss import IGNORE_INDEX, chunked_cross_entropy, next_token_targets
from longlora_jax.model.llama import hidden_states

MODES = ("official", "sliding")


def window_starts(n_tokens: int, seq_len: int, stride: int = 256,
                  mode: str = "official") -> np.ndarray:
  if seq_len < 2 or stride < 1:
    raise LongLoraError(f"a window needs seq_len >= 2 and stride >= 1, got "
                        f"{seq_len} and {stride}")
  if mode == "official":
    starts = list(range(0, n_tokens - seq_len, stride))[:-1]
  elif mode == "sliding":
    starts = list(range(0, n_tokens - seq_len + 1, stride))
  else:
    raise LongLoraError(f"unknown mode {mode!r}; choose one of {MODES}")
  if not starts:
    raise LongLoraError(
        f"the corpus has {n_tokens} tokens, too few for one {mode} window of "
        f"{seq_len} (needs at least {seq_len + 2 * stride}); use a shorter "
        "--seq-len or more data")
  return np.asarray(starts)


def first_scored(starts: np.ndarray, seq_len: int, stride: int, mode: str):
  """Per window, the first position whose next-token prediction is scored."""
  if mode == "official":
    return np.zeros_like(starts)
  return np.where(starts == 0, 0, seq_len - 1 - stride)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _window_losses(config: LlamaConfig, attention, params, ids_BT, first_B):
  """Per window (sum of scored losses, scored count)."""
  h_BTD = hidden_states(config, params, ids_BT, attention=attention)
  targets_BT = next_token_targets(ids_BT)
  t = jnp.arange(ids_BT.shape[1])
  targets_BT = jnp.where(t[None, :] >= first_B[:, None], targets_BT,
                         IGNORE_INDEX)
  return chunked_cross_entropy(config, params, h_BTD, targets_BT)


def evaluate(config: LlamaConfig, params, tokens: np.ndarray, seq_len: int, *,
             stride: int = 256, mode: str = "official", batch_size: int = 1,
             attention="full", max_windows: int | None = None,
             progress=None) -> dict:
  """Perplexity of `tokens` (a 1-D array) at context `seq_len`.

  `max_windows` evaluates that many evenly spaced windows instead of all
  (the full official protocol is one forward pass per 256 tokens).
  """
  starts = window_starts(len(tokens), seq_len, stride, mode)
  if max_windows and len(starts) > max_windows:
    starts = starts[np.linspace(0, len(starts) - 1, max_windows).astype(int)]
  firsts = first_scored(starts, seq_len, stride, mode)
  sums, counts = [], []
  for i in range(0, len(starts), batch_size):
    idx = np.arange(i, i + batch_size).clip(max=len(starts) - 1)  # pad last batch
    ids = np.stack([np.asarray(tokens[s:s + seq_len], np.int32)
                    for s in starts[idx]])
    loss, count = _window_losses(config, attention, params, jnp.asarray(ids),
                                 jnp.asarray(firsts[idx]))
    keep = min(batch_size, len(starts) - i)
    sums.append(np.asarray(loss)[:keep])
    counts.append(np.asarray(count)[:keep])
    if progress is not None:
      progress(keep)
  sums, counts = np.concatenate(sums), np.concatenate(counts)
  if mode == "official":
    loss = float(np.mean(sums / counts))
  else:
    loss = float(sums.sum() / counts.sum())
  return {"seq_len": seq_len, "mode": mode, "windows": len(starts),
          "scored_tokens": int(counts.sum()), "loss": loss,
          "perplexity": float(np.exp(loss))}
