"""Plots people would rather look at than read: saved as PNG next to the metrics and logged to MLflow."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str, ylabel: str, path: str | Path
) -> None:
    """One line per named (x, y) series, saved to `path`."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (x, y) in series.items():
        ax.plot(list(x), list(y), label=name, marker="o" if len(x) < 20 else None)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bar_plot(
    labels: Sequence[str],
    values: Sequence[float],
    title: str,
    ylabel: str,
    path: str | Path,
    counts: Sequence[int] | None = None,
) -> None:
    """Bars with their counts on top."""
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar(list(labels), list(values), color="tab:blue")
    if counts is not None:
        for bar, n in zip(bars, counts, strict=True):
            ax.annotate(f"n={n}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    ax.set(title=title, ylabel=ylabel, ylim=(0, 1.05))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
