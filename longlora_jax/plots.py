"""Plots of results (loss curves, accuracy and perplexity per length),
written atomically as PNG files."""

import os

from longlora_jax.io.files import atomic_path


def save_plot(path: str | os.PathLike, xs, ys, *, xlabel: str, ylabel: str,
              title: str, logy: bool = False,
              marker: str | None = "o") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(xs, ys, marker=marker)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if logy:
    ax.set_yscale("log")
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  with atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=120)
  plt.close(fig)
