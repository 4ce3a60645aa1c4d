"""Results: the CSV columns (one list for every op), appending rows to the CSV, and the printed table."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .timing import Timing

# Every op's rows use exactly these columns; a skipped provider has an empty median_ms and its
# reason in `note`. On CUDA, median_ms is GPU time and host_ms the CPU time to issue the call;
# `peak_mb` is the allocator peak on CUDA and an estimate on the CPU (timing.py says how each is taken); `reps`
# the timed calls behind the median (rows written before 2026-11-28 have no such column).
COLUMNS = (
    "date", "device", "torch_version", "triton_version", "cuda_version", "fusedrl_version",
    "op", "provider", "mode", "shape", "dtype",
    "median_ms", "p20_ms", "p80_ms", "host_ms", "peak_mb", "reps", "bytes",
    "achieved", "achieved_unit", "ceiling", "fraction_of_ceiling", "speedup_vs_eager", "note",
)
META_COLUMNS = COLUMNS[:6]


@dataclass
class Result:
    """One provider on one case (or one ceiling); `timing` is None when it was skipped or failed."""

    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    bytes: int | None = None
    timing: Timing | None = None
    achieved: float | None = None
    achieved_unit: str = ""
    ceiling: float | None = None
    fraction_of_ceiling: float | None = None
    speedup_vs_eager: float | None = None
    note: str = ""
    failed: bool = False  # an error (a bug to report), as opposed to a skip


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def csv_row(meta: Mapping[str, str], r: Result) -> dict[str, str]:
    t = r.timing
    values = {
        "op": r.op, "provider": r.provider, "mode": r.mode, "shape": r.shape, "dtype": r.dtype,
        "median_ms": t and t.median_ms, "p20_ms": t and t.p20_ms, "p80_ms": t and t.p80_ms,
        "host_ms": t and t.host_ms, "peak_mb": t and t.peak_mb, "reps": t and t.reps, "bytes": r.bytes,
        "achieved": r.achieved,
        "achieved_unit": r.achieved_unit if t else "", "ceiling": r.ceiling,
        "fraction_of_ceiling": r.fraction_of_ceiling, "speedup_vs_eager": r.speedup_vs_eager, "note": r.note,
    }
    return {**{k: meta[k] for k in META_COLUMNS}, **{k: _cell(v) for k, v in values.items()}}


def append_csv(path: Path, meta: Mapping[str, str], results: Iterable[Result]) -> None:
    """Append rows to `path`, writing the header only when the file is new or empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != COLUMNS:
            raise ValueError(f"{path} has other columns ({', '.join(header)}); write to another --csv path")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(csv_row(meta, r) for r in results)


TABLE_HEADER = ("op", "provider", "mode", "shape", "dtype", "median ms", "p20", "p80", "host ms", "peak MB",
                "achieved", "% ceiling", "vs eager", "note")
RIGHT_ALIGNED = set(range(5, 13))


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None or math.isnan(value) else format(value, spec)


def table_cells(r: Result) -> tuple[str, ...]:
    t = r.timing
    timed = (
        (_fmt(t.median_ms, ".4g"), _fmt(t.p20_ms, ".4g"), _fmt(t.p80_ms, ".4g"), _fmt(t.host_ms, ".4g"),
         _fmt(t.peak_mb, ".1f"),
         f"{_fmt(r.achieved, '.1f')} {r.achieved_unit}".strip(),
         _fmt(None if r.fraction_of_ceiling is None else 100 * r.fraction_of_ceiling, ".1f"),
         _fmt(r.speedup_vs_eager, ".2f") + ("x" if r.speedup_vs_eager is not None else ""))
        if t else ("",) * 8
    )
    note = r.note if t or r.failed else f"skipped: {r.note}"
    return (r.op, r.provider, r.mode, r.shape, r.dtype) + timed + (note,)


def format_table(results: Iterable[Result]) -> str:
    rows = [TABLE_HEADER] + [table_cells(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]

    def line(row):
        cells = [c.rjust(w) if i in RIGHT_ALIGNED else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths).rstrip()
    return "\n".join([line(rows[0]), rule] + [line(row) for row in rows[1:]])
