"""Figures of an evaluation: the Fig. 4-style image grid, bar plots of Tables II and V, the Fig. 5 sweep lines.

matplotlib runs on the Agg backend (no display); every figure is written to a temporary file and renamed.
"""

from __future__ import annotations

import os
import pathlib
from typing import Mapping, Sequence

import numpy as np

from erasablemask_jax.image_io import save_image_grid

FIG4_COLUMNS = ("source", "attribute edit", "FGSM", "PGD", "protected", "restored")


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  return plt


def _save(fig, path: pathlib.Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
  fig.savefig(tmp, dpi=100, bbox_inches="tight")
  os.replace(tmp, path)


def image_grid(path: str | os.PathLike[str], columns: Sequence[np.ndarray]) -> None:
  """Fig. 4 layout: one row per face, one column per image kind (`FIG4_COLUMNS`), float [-1, 1] inputs."""
  save_image_grid(pathlib.Path(path), [np.asarray(c) for c in columns])


def grouped_bars(path: str | os.PathLike[str], groups: Sequence[str], series: Mapping[str, Sequence[float | None]],
                 title: str, ylabel: str = "%") -> None:
  """Grouped bars: one group per `groups` entry, one bar per series (None: a missing value, drawn as nothing).

  Args:
    path: PNG to write.
    groups: x-axis group labels (e.g. FR models).
    series: label -> one value per group (in percent).
    title: figure title.
    ylabel: y-axis label.
  """
  plt = _pyplot()
  n = max(len(series), 1)
  width = 0.8 / n
  fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(groups) * n * 0.6 + 2), 3.5))
  x = np.arange(len(groups))
  for k, (label, values) in enumerate(series.items()):
    heights = [np.nan if v is None else v for v in values]
    ax.bar(x + (k - (n - 1) / 2) * width, heights, width, label=label)
  ax.set_xticks(x, groups, rotation=15, ha="right")
  ax.set_ylabel(ylabel)
  ax.set_ylim(0, 130)  # headroom for the legend
  ax.set_title(title)
  ax.legend(fontsize="small", ncols=min(n, 3))
  _save(fig, pathlib.Path(path))
  plt.close(fig)


def sweep_lines(path: str | os.PathLike[str], param: str, values: Sequence[float],
                series: Mapping[str, Sequence[float | None]], title: str, ylabel: str = "%") -> None:
  """Fig. 5: one line per series against the swept parameter's values (sorted)."""
  plt = _pyplot()
  order = np.argsort(values)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for label, ys in series.items():
    xs = [values[i] for i in order]
    y = [np.nan if ys[i] is None else ys[i] for i in order]
    ax.plot(xs, y, marker="o", label=label)
  ax.set_xlabel(param)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize="small")
  _save(fig, pathlib.Path(path))
  plt.close(fig)
