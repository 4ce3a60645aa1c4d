"""Charts and a Markdown summary of a results CSV (`fusedrl bench --plot DIR [--from-csv CSV]`).

`draw_charts(csv, out_dir)` writes one PNG per op: a row of three panels per (mode, dtype) — median
time (log scale), % of the device's ceiling and peak memory — against the case's shapes (ordered by
the work they count), one line per provider (bars side by side where a group has at most two shapes:
the whole training steps, one per model size; the peers' bars hatched). `summary_markdown(csv)` gives,
per case, fusedrl's fastest kernel (or whole-step variant) against its torch path, the eager formula
and the best other provider, as a Markdown table (`benchmarks/results/README.md` is built from it).
Both read one device's rows: the device of the newest row unless `device` names one; a case measured
several times keeps its latest row.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

FUSEDRL_PROVIDERS = ("torch", "triton", "triton_chunked", "cuda")  # triton_chunked: token_logprobs' other strategy
BASELINES = ("eager", "compile")
BAR_MAX_SHAPES = 2  # groups with this few shapes are drawn as bars (a line between two model sizes means nothing)


def is_fusedrl(provider: str) -> bool:
    """fusedrl's own providers: an op's backends, and the whole-step cases' "fusedrl*" variants."""
    return provider in FUSEDRL_PROVIDERS or provider.startswith("fusedrl")


@dataclass(frozen=True)
class Row:
    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    median_ms: float
    peak_mb: float
    percent: float  # % of the ceiling, nan when the case counts no work
    work: float  # the bytes or FLOPs the case counts (orders the shapes)
    date: str


def read_rows(csv_path: str | Path, device: str | None = None) -> tuple[str, list[Row]]:
    """(device, the timed rows of that device), the latest row of each (op, mode, shape, dtype, provider)."""
    with open(csv_path, newline="") as f:
        raw = [r for r in csv.DictReader(f) if r.get("op") and r["op"] != "ceiling" and r.get("median_ms")]
    if not raw:
        raise ValueError(f"{csv_path} holds no timed rows")
    devices = {r["device"] for r in raw}
    if device is None:
        device = max(raw, key=lambda r: r["date"])["device"]
    elif device not in devices:
        raise ValueError(f"{csv_path} has no rows of device {device!r}; it has {sorted(devices)}")
    latest: dict[tuple, Row] = {}
    for r in sorted((r for r in raw if r["device"] == device), key=lambda r: r["date"]):
        median = float(r["median_ms"])
        fraction = float(r["fraction_of_ceiling"]) if r["fraction_of_ceiling"] else math.nan
        achieved = float(r["achieved"]) if r["achieved"] else math.nan
        unit_scale = 1e12 if r["achieved_unit"] == "TFLOP/s" else 1e9
        row = Row(r["op"], r["provider"], r["mode"], r["shape"], r["dtype"], median,
                  float(r["peak_mb"]) if r["peak_mb"] else math.nan, 100 * fraction,
                  achieved * unit_scale * median * 1e-3 if not math.isnan(achieved) else _shape_size(r["shape"]),
                  r["date"])
        latest[(row.op, row.mode, row.shape, row.dtype, row.provider)] = row
    return device, list(latest.values())


def _shape_size(shape: str) -> float:
    return float(math.prod(int(d) for d in re.findall(r"\d+", shape)) or 0)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def draw_charts(csv_path: str | Path, out_dir: str | Path, device: str | None = None) -> list[Path]:
    """One PNG per op in `out_dir` (created); returns their paths. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    device, rows = read_rows(csv_path, device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for op in sorted({r.op for r in rows}):
        groups = sorted({(r.mode, r.dtype) for r in rows if r.op == op})
        palette = plt.get_cmap("tab20").colors
        color = {p: palette[i % len(palette)] for i, p in enumerate(sorted({r.provider for r in rows if r.op == op}))}
        fig, axes = plt.subplots(len(groups), 3, figsize=(15, 3.2 * len(groups)), squeeze=False)
        for (mode, dtype), ax_row in zip(groups, axes):
            group = [r for r in rows if r.op == op and r.mode == mode and r.dtype == dtype]
            shapes = sorted({r.shape for r in group}, key=lambda s: min(r.work for r in group if r.shape == s))
            x_of = {s: i for i, s in enumerate(shapes)}
            providers = sorted({r.provider for r in group})
            bars = len(shapes) <= BAR_MAX_SHAPES  # providers side by side at each shape
            width = 0.8 / len(providers)
            for k, provider in enumerate(providers):
                line = sorted((r for r in group if r.provider == provider), key=lambda r: x_of[r.shape])
                xs = [x_of[r.shape] for r in line]
                for ax, values in zip(ax_row, ([r.median_ms for r in line], [r.percent for r in line],
                                               [r.peak_mb for r in line])):
                    if bars:
                        ax.bar([x - 0.4 + (k + 0.5) * width for x in xs], values, width, label=provider,
                               color=color[provider], hatch="" if is_fusedrl(provider) else "//")
                    else:
                        ax.plot(xs, values, marker="o", label=provider, color=color[provider],
                                linestyle="-" if is_fusedrl(provider) else "--")
            for ax, label in zip(ax_row, ("median ms" if bars else "median ms (log)", "% of ceiling", "peak MB")):
                ax.set_title(f"{op} {mode} {dtype}: {label}", fontsize=9)
                ax.set_xticks(range(len(shapes)), shapes, rotation=20, ha="right", fontsize=7)
                ax.grid(alpha=0.3)
            if not bars:  # a bar's length must mean its value
                ax_row[0].set_yscale("log")
            ax_row[0].legend(fontsize=7)
        fig.suptitle(f"{op} on {device}", fontsize=11)
        fig.tight_layout()
        path = out_dir / f"{_safe(op)}.png"
        fig.savefig(path, dpi=72)
        plt.close(fig)
        written.append(path)
    return written


def summary_markdown(csv_path: str | Path, device: str | None = None) -> str:
    """Per case: fusedrl's fastest kernel (Triton or CUDA), its torch path, the eager formula and the
    fastest other provider (peers, SDPA backends, torch.compile), as a Markdown table; the ratios are
    each provider's time over the kernel's (above 1: the kernel is faster)."""
    device, rows = read_rows(csv_path, device)
    lines = [f"Device: {device}. Medians in ms; (x) = that time / the fusedrl kernel's time.", "",
             "| op | mode | shape | dtype | fusedrl kernel | % ceiling | peak MB | fusedrl torch | eager | "
             "best other |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for op, mode, shape, dtype in sorted({(r.op, r.mode, r.shape, r.dtype) for r in rows}):
        group = {r.provider: r for r in rows if (r.op, r.mode, r.shape, r.dtype) == (op, mode, shape, dtype)}
        kernels = [r for p, r in group.items() if is_fusedrl(p) and p != "torch"]
        if not kernels and "torch" in group:  # a CPU run: fusedrl's torch path is what it measured
            kernels = [group["torch"]]
        if not kernels:
            continue
        best = min(kernels, key=lambda r: r.median_ms)
        others = [r for p, r in group.items() if not is_fusedrl(p) and p != "eager"]
        other = min(others, key=lambda r: r.median_ms) if others else None

        def vs(r: Row | None, name: bool = False, kernel: Row = best) -> str:
            if r is None:
                return ""
            return f"{r.median_ms:.4g} ({r.median_ms / kernel.median_ms:.2f}x){f' {r.provider}' if name else ''}"

        percent = "" if math.isnan(best.percent) else f"{best.percent:.0f}%"
        peak = "" if math.isnan(best.peak_mb) else f"{best.peak_mb:.0f}"
        lines.append(f"| {op} | {mode} | {shape} | {dtype} | {best.median_ms:.4g} {best.provider} | {percent} | "
                     f"{peak} | {vs(group.get('torch'))} | {vs(group.get('eager'))} | {vs(other, True)} |")
    if len(lines) == 4:
        lines.append("| (no fusedrl row in this CSV for this device) | | | | | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m fusedrl.bench.plot CSV OUT_DIR`: charts, and the summary table printed."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fusedrl.bench.plot", description=main.__doc__)
    parser.add_argument("csv")
    parser.add_argument("out_dir")
    parser.add_argument("--device", default=None, help="the device whose rows to draw (default: the newest row's)")
    args = parser.parse_args(argv)
    for path in draw_charts(args.csv, args.out_dir, args.device):
        print(f"wrote {path}")
    print(summary_markdown(args.csv, args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
