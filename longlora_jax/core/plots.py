"""Plots of results (loss curves, accuracy and perplexity per length,
heatmaps of scores), written atomically as PNG files."""

import os

from longlora_jax.core.files import atomic_path


def save_plot(path: str | os.PathLike, xs, ys, *, xlabel: str, ylabel: str,
              title: str, logy: bool = False,
              marker: str | None = "o") -> None:
  """One line of `ys` over `xs`."""
  save_lines(path, {None: (xs, ys)}, xlabel=xlabel, ylabel=ylabel,
             title=title, logy=logy, marker=marker)


def save_lines(path: str | os.PathLike, lines: dict, *, xlabel: str,
               ylabel: str, title: str, logy: bool = False,
               marker: str | None = "o") -> None:
  """Several lines, `lines` label -> (xs, ys), with a legend (none when the
  one label is None)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4) if len(lines) < 2 else (8, 5))
  for label, (xs, ys) in lines.items():
    ax.plot(xs, ys, marker=marker, label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if logy:
    ax.set_yscale("log")
  ax.grid(True, alpha=0.3)
  if any(label is not None for label in lines):
    ax.legend(fontsize=7)
  fig.tight_layout()
  with atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=120)
  plt.close(fig)


def save_heatmap(path: str | os.PathLike, values, *, rows, columns,
                 xlabel: str, ylabel: str, title: str, vmax: float = 100.0,
                 colorbar: str = "score") -> None:
  """`values` `[rows, columns]` as coloured cells from 0 (red) to `vmax`
  (green), each labelled with its value; NaN cells stay grey ("n/a")."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  values = np.asarray(values, float)
  fig, ax = plt.subplots(figsize=(max(5.0, 2.4 + 0.9 * len(columns)),
                                  1.6 + 0.35 * len(rows)))
  cmap = matplotlib.colormaps["RdYlGn"].with_extremes(bad="0.85")
  image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0,
                    vmax=vmax, aspect="auto")
  for (i, j), v in np.ndenumerate(values):
    ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.0f}", ha="center",
            va="center", fontsize=8)
  ax.set_xticks(range(len(columns)), [str(c) for c in columns])
  ax.set_yticks(range(len(rows)), [str(r) for r in rows])
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  fig.colorbar(image, ax=ax, label=colorbar)
  fig.tight_layout()
  with atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=120)
  plt.close(fig)
