"""An optional PNG of the results: each case's providers as bars of % of the device's ceiling."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .report import Result


def save_plot(results: Iterable[Result], path: Path) -> str:
    """Draw the timed, non-ceiling results to `path`; returns a line saying what was done."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on benchmark machines
        import matplotlib.pyplot as plt
    except ImportError:
        return f"--plot: matplotlib is not installed; {path} not written"
    timed = [r for r in results if r.timing is not None and r.op != "ceiling"]
    if not timed:
        return f"--plot: nothing was timed; {path} not written"
    groups: dict[str, list[Result]] = {}
    for r in timed:
        groups.setdefault(f"{r.op} {r.mode}\n{r.shape} {r.dtype}", []).append(r)
    providers = sorted({r.provider for r in timed})
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.6 * len(groups)), 5))
    for i, provider in enumerate(providers):
        xs, ys = [], []
        for g, (_, rows) in enumerate(groups.items()):
            for r in rows:
                if r.provider == provider:
                    xs.append(g + (i - (len(providers) - 1) / 2) * width)
                    ys.append(100 * r.fraction_of_ceiling)
        ax.bar(xs, ys, width=width, label=provider)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=7)
    ax.set_ylabel("% of ceiling (copy bandwidth or bf16 matmul)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"
