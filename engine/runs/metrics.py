"""metrics.csv: one row per `Run.log` call, a column per metric, greppable and loadable by any CSV reader.

Columns are `step`, `time` (Unix seconds), then the metrics in the order they first appeared. A metric that
appears later (an eval metric first logged at step 50) adds a column: the file is rewritten once with the wider
header (atomically), earlier rows leaving it empty. Values are written with `repr(float)`, which round-trips
exactly. Rows are flushed as they are written and fsynced when a checkpoint is saved, so every row up to a
checkpoint survives a crash.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text

RESERVED = ("step", "time")


def to_float(name: str, value: Any) -> float:
    """A metric value (Python/numpy number, bool, or one-element tensor) as a float."""
    if hasattr(value, "numel") and hasattr(value, "item"):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} is a tensor with {value.numel()} elements; log a scalar")
        value = value.item()
    elif hasattr(value, "item") and callable(value.item):  # numpy scalar
        value = value.item()
    if isinstance(value, (bool, int, float)):
        return float(value)
    raise TypeError(f"metric {name!r} must be a number; got {type(value).__name__}")


def format_value(value: float) -> str:
    return repr(float(value)) if math.isfinite(value) else str(value)


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The rows of a metrics.csv as dicts (empty cells left out; step as int). Torn rows are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            try:
                parsed: dict[str, Any] = {"step": int(row["step"])}
                for key, cell in row.items():
                    if key != "step" and key is not None and cell not in (None, ""):
                        parsed[key] = float(cell)
            except (TypeError, ValueError):
                continue
            rows.append(parsed)
    return rows


class MetricsCSV:
    """Appends rows to a metrics CSV; widens the header when a new metric appears."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.columns: list[str] = list(RESERVED)
        self._fh: io.TextIOWrapper | None = None
        if self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as fh:
                header = next(csv.reader(fh), None)
            if header:
                self.columns = header

    def _open(self) -> io.TextIOWrapper:
        if self._fh is None:
            new = not self.path.exists() or self.path.stat().st_size == 0
            self._fh = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - kept open for appends
            if new:
                csv.writer(self._fh).writerow(self.columns)
        return self._fh

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        self.close()
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(self.columns)
        for row in rows:
            writer.writerow([self._cell(row, c) for c in self.columns])
        atomic_write_text(self.path, buf.getvalue())

    @staticmethod
    def _cell(row: Mapping[str, Any], column: str) -> str:
        value = row.get(column)
        if value is None:
            return ""
        if column == "step":
            return str(int(value))
        return format_value(value) if column != "time" else f"{value:.3f}"

    def append(self, step: int, metrics: Mapping[str, float], time: float) -> None:
        """Write one row; `metrics` values are floats already."""
        new = [k for k in metrics if k not in self.columns]
        if new:
            rows = read_metrics(self.path)
            self.columns = self.columns + new
            self._rewrite(rows)
        row = {"step": step, "time": time, **metrics}
        fh = self._open()
        csv.writer(fh).writerow([self._cell(row, c) for c in self.columns])
        fh.flush()

    def truncate_after(self, step: int) -> int:
        """Drop rows with a step greater than `step` (and torn rows); return how many were dropped."""
        if not self.path.exists():
            return 0
        with open(self.path, newline="", encoding="utf-8") as fh:
            n_lines = sum(1 for _ in csv.reader(fh)) - 1
        rows = read_metrics(self.path)
        kept = [r for r in rows if r["step"] <= step]
        if len(kept) != n_lines:
            self._rewrite(kept)
        return n_lines - len(kept)

    def sync(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def reward_summary(metrics_csv: Path, key: str = "reward_mean") -> str | None:
    """'reward_mean: first k steps a -> last k steps b (+d)' from a metrics.csv, k = min(10, steps // 4)."""
    rows = [r for r in read_metrics(metrics_csv) if key in r and r["step"] > 0]
    if len(rows) < 2:
        return None
    k = max(1, min(10, len(rows) // 4))
    first = sum(r[key] for r in rows[:k]) / k
    last = sum(r[key] for r in rows[-k:]) / k
    return f"{key}: first {k} steps {first:.4g} -> last {k} steps {last:.4g} ({last - first:+.4g})"
