"""Prompt records for LLM GRPO: a prompt and, for verifiable rewards, its reference answer.

    records = load_prompt_records("train.jsonl", prompt_field="question", answer_field="answer", seed=0)
    batch = prompt_batch(records, step=12, per_step=8, seed=0)            # the records of training step 12

Sources: a .jsonl / .json file (an object per line, or a JSON list of objects), a .csv file (a header row), a
.parquet file (needs pandas or pyarrow), a `datasets` dataset name or a folder saved with `save_to_disk`, or a
Python list of strings / dicts / (prompt, answer) pairs.

`prompt_batch` is a pure function of (step, seed): a run resumed at step k draws exactly the prompts the killed
run would have drawn, with no iterator state to save. Each epoch (a pass over the records) has its own
permutation, seeded by (seed, epoch).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PromptRecord", "load_prompt_records", "prompt_batch"]


@dataclass(frozen=True)
class PromptRecord:
    """One training prompt and its reference answer (None when the data has none)."""

    prompt: str
    answer: Any = None


def _rows_jsonl(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        return [r if isinstance(r, dict) else {"prompt": r} for r in rows]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if isinstance(row, str):
            row = {"prompt": row}
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: each line must be a JSON object (or a string)")
        rows.append({"_line": n, **row})
    return rows


def _rows_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as f:
        return [{"_line": n, **row} for n, row in enumerate(csv.DictReader(f), 2)]


def _rows_parquet(path: Path) -> list[dict]:
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


def _rows_dataset(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ModuleNotFoundError as exc:
        raise ImportError(f"{name!r} is not a .jsonl/.json/.csv/.parquet file; loading it as a dataset needs the "
                          "`datasets` package (pip install datasets)") from exc
    path = Path(name).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{name}: no split {split!r} (splits: {list(ds)}); set prompts.split")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name, split=split)
    return list(ds)


def _records(rows: list[dict], prompt_field: str, answer_field: str | None, source: str) -> list[PromptRecord]:
    out = []
    for i, row in enumerate(rows):
        where = f"{source}:{row['_line']}" if "_line" in row else f"{source}[{i}]"
        if prompt_field not in row:
            fields = sorted(k for k in row if k != "_line")
            raise ValueError(f"{where}: no field {prompt_field!r} (fields: {fields}); set prompts.prompt_field")
        prompt = row[prompt_field]
        if not isinstance(prompt, str):
            raise TypeError(f"{where}: the prompt is a {type(prompt).__name__}, not a string: {prompt!r} (chat "
                            "message lists are not supported yet: render them to text first)")
        if not prompt.strip():
            continue
        answer = row.get(answer_field) if answer_field is not None else None
        out.append(PromptRecord(prompt, answer))
    if not out:
        raise ValueError(f"{source}: no prompts (empty, or only blank prompts)")
    return out


def load_prompt_records(
    source: str | os.PathLike | Sequence[Any],
    *,
    prompt_field: str = "prompt",
    answer_field: str | None = "answer",
    split: str = "train",
    seed: int | None = None,
    limit: int | None = None,
) -> list[PromptRecord]:
    """Load prompt records.

    Args:
        source: a file (.jsonl/.json/.csv/.parquet), a `datasets` name or saved folder, or a list of strings,
            dicts (with `prompt_field` / `answer_field`) or (prompt, answer) pairs.
        prompt_field / answer_field: the columns; a missing answer column gives answer None (rewards that need
            answers then refuse with a clear error). answer_field=None ignores answers.
        split: the dataset split.
        seed: shuffle with random.Random(seed) (deterministic); None keeps the order.
        limit: keep the first `limit` records (after shuffling).

    Returns:
        list[PromptRecord]. Blank prompts are dropped. Raises FileNotFoundError for a missing file, ValueError
        for an empty source or a missing prompt column (naming the line).
    """
    if isinstance(source, (list, tuple)):
        rows = []
        for item in source:
            if isinstance(item, str):
                rows.append({prompt_field: item})
            elif isinstance(item, dict):
                rows.append(item)
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                rows.append({prompt_field: item[0], **({answer_field: item[1]} if answer_field else {})})
            else:
                raise TypeError(f"prompts: each item must be a str, a dict or a (prompt, answer) pair; got {item!r}")
        records = _records(rows, prompt_field, answer_field, "prompts")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        ext = path.suffix.lower()
        if ext in (".jsonl", ".json", ".csv", ".parquet"):
            if not path.is_file():
                raise FileNotFoundError(f"prompt file {str(source)!r} does not exist")
            reader = {".jsonl": _rows_jsonl, ".json": _rows_jsonl, ".csv": _rows_csv, ".parquet": _rows_parquet}[ext]
            records = _records(reader(path), prompt_field, answer_field, str(path))
        else:
            records = _records(_rows_dataset(str(source), split), prompt_field, answer_field, str(source))
    else:
        raise TypeError(f"prompts source must be a path, a dataset name or a list; got {type(source).__name__}")
    if seed is not None:
        random.Random(seed).shuffle(records)
    if limit is not None:
        records = records[:limit]
    return records


def prompt_batch(records: Sequence[PromptRecord], step: int, per_step: int, seed: int) -> list[PromptRecord]:
    """The `per_step` records of training step `step` (>= 1): consecutive slices of per-epoch permutations
    seeded by (seed, epoch), so the batch of any step is known without replaying the earlier ones."""
    n = len(records)
    if n == 0:
        raise ValueError("no prompt records")
    out = []
    perms: dict[int, list[int]] = {}
    for i in range((step - 1) * per_step, step * per_step):
        epoch, j = divmod(i, n)
        if epoch not in perms:
            perm = list(range(n))
            random.Random(seed * 1_000_003 + epoch).shuffle(perm)
            perms[epoch] = perm
        out.append(records[perms[epoch][j]])
    return out
