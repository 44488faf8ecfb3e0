"""Every plot mechscope draws, in one place. Functions take plain tensors/arrays and labels, write a PNG
(and return its path); nothing here computes interpretability results.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _array(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=float)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def heatmap(values, path: Path, row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
            title: str = "", xlabel: str = "", ylabel: str = "", colorbar_label: str = "",
            diverging: bool = True, annotate: bool | None = None) -> Path:
    """values: [rows, cols]. Diverging maps are centred on 0; token labels go on the columns."""
    data = _array(values)
    rows, cols = data.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * cols + 2), max(3.0, 0.4 * rows + 1.5)))
    if diverging:
        bound = float(np.nanmax(np.abs(data))) or 1.0
        im = ax.imshow(data, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    else:
        im = ax.imshow(data, cmap="viridis", aspect="auto")
    ax.set_xticks(range(cols))
    ax.set_xticklabels(col_labels if col_labels is not None else range(cols), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(rows))
    ax.set_yticklabels(row_labels if row_labels is not None else range(rows), fontsize=8)
    if annotate if annotate is not None else rows * cols <= 200:
        for i in range(rows):
            for j in range(cols):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=6)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(im, ax=ax, label=colorbar_label)
    return _save(fig, path)


def lines(curves: dict[str, Sequence[float]], path: Path, x_labels: Sequence[str] | None = None,
          title: str = "", xlabel: str = "", ylabel: str = "") -> Path:
    """One line per named curve over a shared x axis (e.g. per-layer probability of a target)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in curves.items():
        ys = _array(ys)
        ax.plot(range(len(ys)), ys, marker="o", label=name)
    if x_labels is not None:
        ax.set_xticks(range(len(x_labels)))
        ax.set_xticklabels(x_labels, rotation=60, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


def bars(values, labels: Sequence[str], path: Path, title: str = "", xlabel: str = "") -> Path:
    """Horizontal bars, one per label, in the order given (sort before calling)."""
    data = _array(values)
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.28 * len(labels) + 1)))
    ax.barh(range(len(data)), data, color=["#c0392b" if v > 0 else "#2e86c1" for v in data])
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    return _save(fig, path)
