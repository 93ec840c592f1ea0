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


def scatter_plot(
    points: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]],
    title: str,
    xlabel: str,
    ylabel: str,
    path: str | Path,
    colour_label: str = "PPO step",
    lines: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None,
) -> None:
    """Named point sets (x, y, colour values or None) and optional lines, saved to `path`: points coloured by their
    step read at a glance where a line joining them in step order would zigzag back and forth."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, (x, y) in (lines or {}).items():
        ax.plot(list(x), list(y), label=name, marker="s", color="tab:gray", linestyle="--")
    markers = iter("o^Dv")
    for name, (x, y, colour) in points.items():
        if colour is None:
            ax.scatter(list(x), list(y), label=name, marker=next(markers), s=60, zorder=3)
        else:
            shown = ax.scatter(
                list(x), list(y), c=list(colour), cmap="viridis", label=name, marker=next(markers), zorder=3
            )
            fig.colorbar(shown, ax=ax, label=colour_label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
