"""Prompt data both engines read: rows from files or `datasets`, and the batch of a training step.

    rows = read_rows("train.jsonl")                  # [{"_line": 1, "prompt": ..., ...}, ...]
    batch = epoch_batch(prompts, index=12, size=8, seed=0)

Files: .txt (a prompt per line: {"prompt": line}), .jsonl (an object or a string per line), .json (the same, or
one JSON list), .csv (a header row), .parquet (needs pyarrow or pandas); anything else is a `datasets` dataset
name or a folder saved with `save_to_disk` (or holding data files). Rows from files carry "_line", the line they
came from, for error messages.

`epoch_batch` is a pure function of its arguments: a run resumed at step k draws exactly the items the killed
run would have drawn, with no iterator state to save. Each epoch (a pass over the items) has its own
permutation, seeded by (seed, epoch).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["FILE_TYPES", "epoch_batch", "read_rows"]

FILE_TYPES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
_UNSUPPORTED = (".tsv", ".xlsx", ".xls", ".yaml", ".yml", ".xml", ".gz", ".zip")  # files, but not ones read here
T = TypeVar("T")


def _rows_txt(path: Path, field: str) -> list[dict]:
    return [{"_line": n, field: line} for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1)]


def _rows_json(path: Path, field: str) -> list[dict]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        return [r if isinstance(r, dict) else {field: r} for r in rows]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if isinstance(row, str):
            row = {field: row}
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: each line must be a JSON object (or a string)")
        rows.append({"_line": n, **row})
    return rows


def _rows_csv(path: Path, field: str) -> list[dict]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        rows = [{"_line": n, **row} for n, row in enumerate(reader, 2)]
        if reader.fieldnames is not None and field not in reader.fieldnames:
            raise ValueError(f"{path}: no column {field!r} (columns: {reader.fieldnames})")
    return rows


def _rows_parquet(path: Path, field: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except ModuleNotFoundError:
        pass
    try:
        import pandas as pd
    except ModuleNotFoundError as exc:
        raise ImportError(f"{path}: reading .parquet files needs pyarrow or pandas (pip install pyarrow)") from exc
    return pd.read_parquet(path).to_dict("records")


def _rows_dataset(name: str, split: str, field: str) -> list[dict]:
    try:
        import datasets
    except ModuleNotFoundError as exc:
        raise ImportError(f"{name!r} is not a {'/'.join(FILE_TYPES)} file; loading it as a dataset needs the "
                          "`datasets` package (pip install datasets)") from exc
    path = Path(name).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{name}: no split {split!r} (splits: {list(ds)})")
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as exc:  # network, hub and format errors alike: say what was looked for
            raise ValueError(f"{name!r} is no {'/'.join(FILE_TYPES)} file, and loading it as a datasets dataset "
                             f"failed: {type(exc).__name__}: {exc}") from exc
    if field not in ds.column_names:
        raise ValueError(f"dataset {name!r} (split {split!r}) has no column {field!r} (columns: {ds.column_names})")
    return list(ds)


def read_rows(source: str | os.PathLike, *, field: str = "prompt", split: str = "train") -> list[dict[str, Any]]:
    """The rows of a prompt file or dataset (module docstring). `field` is the prompt's field: what a bare
    string (a .txt line, a JSONL string) is stored under, and the column a CSV / dataset must have.
    FileNotFoundError for a missing file of a known type; ValueError naming the line or column otherwise."""
    path = Path(source).expanduser()
    ext = path.suffix.lower()
    if ext in _UNSUPPORTED:
        raise ValueError(f"prompt file {str(source)!r}: unsupported extension {ext!r}; use one of "
                         f"{', '.join(FILE_TYPES)} (or a datasets dataset)")
    if ext not in FILE_TYPES:
        if ext and "/" not in str(source) and not path.is_dir():  # "prompts.tsv2": a file name, not a hub dataset id
            raise ValueError(f"prompt file {str(source)!r}: unknown extension {ext!r}; use one of "
                             f"{', '.join(FILE_TYPES)} (or a datasets dataset: a hub id or a saved folder)")
        return _rows_dataset(str(source), split, field)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(source)!r} does not exist")
    reader = {".txt": _rows_txt, ".jsonl": _rows_json, ".json": _rows_json, ".csv": _rows_csv,
              ".parquet": _rows_parquet}[ext]
    return reader(path, field)


def epoch_batch(items: Sequence[T], index: int, size: int, *, seed: int = 0) -> list[T]:
    """The `size` items of batch `index` (0-based): consecutive slices of per-epoch permutations (epoch e
    shuffled by random.Random(f"{seed}:{e}")), wrapping into the next epoch."""
    if not items:
        raise ValueError("no prompts to draw from")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"step must be an int >= 0, got {index!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {size!r}")
    n = len(items)
    orders: dict[int, list[int]] = {}
    out = []
    for pos in range(index * size, (index + 1) * size):
        epoch, i = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(f"{seed}:{epoch}").shuffle(orders[epoch])
        out.append(items[orders[epoch][i]])
    return out
