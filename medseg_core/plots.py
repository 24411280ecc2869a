"""PNG plots of run histories (matplotlib, headless)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _finite(xs: Sequence[Any], ys: Sequence[Any]) -> tuple[list, list]:
    pairs = [(x, y) for x, y in zip(xs, ys, strict=False) if y is not None and math.isfinite(float(y))]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def plot_curves(
    series: Mapping[str, Mapping[str, Sequence[Any]]],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "epoch",
) -> Path:
    """One panel per group of curves, saved as a PNG.

    Args:
        series: ``{panel_title: {curve_label: [y per x]}}``; x is 1..len(y); NaN/None points are skipped.
        path: output PNG.
    """
    panels = list(series.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (panel, curves) in zip(axes[0], panels, strict=True):
        for label, ys in curves.items():
            xs, ys_ok = _finite(list(range(1, len(ys) + 1)), ys)
            if ys_ok:
                ax.plot(xs, ys_ok, marker="o" if len(ys_ok) < 30 else None, ms=3, label=label)
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
