"""Accuracy heatmaps: one panel per method, a value in [0, 1] per cell (NaN: no sample)."""

from __future__ import annotations

import numpy as np


def heatmap(path, panels: dict[str, np.ndarray], x_labels: list[str], y_labels: list[str], xlabel: str,
            ylabel: str, title: str, label: str = "accuracy") -> None:
  """Writes a PNG: for each method a [len(y_labels), len(x_labels)] grid, coloured red to green, each cell written."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  width = max(5.0, 1.5 + (1.4 + 0.8 * len(x_labels)) * len(panels))
  height = 1.8 + 0.35 * len(y_labels)
  fig, axes = plt.subplots(1, len(panels), figsize=(width, max(4.2, height)), squeeze=False, layout="constrained")
  for ax, (method, grid) in zip(axes[0], panels.items()):
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
    for (row, col), value in np.ndenumerate(grid):
      ax.text(col, row, "-" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(x_labels)), x_labels, rotation=45)
    ax.set_yticks(range(len(y_labels)), y_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(method)
  fig.colorbar(image, ax=list(axes[0]), label=label)
  fig.suptitle(title, fontsize=10)
  fig.savefig(path, dpi=120)
  plt.close(fig)
