"""Metric curves as a PNG (matplotlib's Agg canvas; no display and no pyplot global state needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .atomic import atomic_write
from .metrics import RESERVED, read_metrics


def default_plot_keys(columns: Sequence[str]) -> list[str]:
    """Columns with "reward" in their name, else "loss"-like ones, else the first four metrics."""
    metrics = [c for c in columns if c not in RESERVED]
    rewards = [c for c in metrics if "reward" in c.lower()]
    if rewards:
        return rewards[:8]
    losses = [c for c in metrics if "loss" in c.lower()]
    return losses[:8] or metrics[:4]


def plot_metrics(csv_path: str | Path, png_path: str | Path, keys: Sequence[str] | None = None,
                 title: str | None = None) -> Path | None:
    """Plot `keys` (default: `default_plot_keys`) of a metrics.csv against step, one panel per key, into
    `png_path` (written atomically). Returns the PNG path, or None when there is nothing to plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(csv_path)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    keys = list(keys) if keys is not None else default_plot_keys(columns)
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return None
    fig = Figure(figsize=(6.4, 2.2 * len(keys) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.2)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    return atomic_write(png_path, lambda p: fig.savefig(p, format="png", dpi=100))
