"""Plots are PNG files, written whole, with the colours they promise."""

import numpy as np
from matplotlib import image

from longlora_jax.core import plots


def _colours(path):
  pixels = image.imread(path)[..., :3].reshape(-1, 3)
  return np.unique(np.round(pixels, 2), axis=0)


def _has(colours, rgb, tol=0.02):
  return bool((np.abs(colours - np.asarray(rgb)).max(axis=1) <= tol).any())


def test_save_plot_writes_a_png_and_nothing_else(tmp_path):
  path = tmp_path / "loss.png"
  plots.save_plot(path, [1, 2, 3], [3.0, 2.0, 1.5], xlabel="step",
                  ylabel="loss", title="loss", logy=True)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]


def test_heatmap_cells_go_from_red_to_green_and_nan_is_grey(tmp_path):
  path = tmp_path / "scores.png"
  plots.save_heatmap(path, [[0.0, np.nan], [100.0, 50.0]], rows=["a", "b"],
                     columns=[1024, 2048], xlabel="length", ylabel="task",
                     title="scores")
  colours = _colours(path)
  # matplotlib's RdYlGn at its ends (red at 0, green at vmax), and 0.85 grey.
  assert _has(colours, (0.647, 0.0, 0.149))
  assert _has(colours, (0.0, 0.408, 0.216))
  assert _has(colours, (0.85, 0.85, 0.85))
