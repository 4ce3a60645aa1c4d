"""Prompt lists: from a .txt / .jsonl / .csv file or a `datasets` dataset, shuffled deterministically.

    train = load_prompts("prompts.jsonl", field="prompt", seed=0)          # list[str], shuffled by seed
    evals = load_prompts("eval.txt")                                        # separate eval prompts, file order
    batch = prompt_batch(train, step=12, batch_size=8, seed=0)              # the prompts of training step 12

`prompt_batch` is a pure function of (step, seed): a run resumed at step k draws exactly the prompts the
killed run would have drawn, with no iterator state to save. Each epoch (a pass over the list) uses its own
permutation, seeded by (seed, epoch).
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEFAULT_EVAL_PROMPTS", "DEFAULT_PROMPTS", "load_prompts", "prompt_batch"]

# The embedded default's prompts (short: the tiny text encoders read 16 characters).
DEFAULT_PROMPTS = [
    "a red apple", "a blue sky", "green grass", "a yellow sun", "a white cat", "a black dog", "an orange fox",
    "a purple flower", "a brown bear", "a grey wolf", "a pink pig", "a gold ring", "a silver car",
    "a dark forest", "a bright beach", "snowy hills",
]
DEFAULT_EVAL_PROMPTS = ["a red house", "a blue bird", "a green frog", "a white boat"]


def _clean(prompts: list, source: str) -> list[str]:
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{source}: prompt {i} is a {type(p).__name__}, not a string: {p!r}")
        p = p.strip()
        if p:
            out.append(p)
    if not out:
        raise ValueError(f"{source}: no prompts (empty, or only blank lines / empty fields)")
    return out


def _read_txt(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _read_jsonl(path: Path, field: str) -> list[str]:
    prompts = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if isinstance(row, str):
                prompts.append(row)
                continue
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object with a {field!r} field (or a string)")
            if field not in row:
                raise ValueError(f"{path}:{n}: no field {field!r} (fields: {sorted(row)}); set field=...")
            prompts.append(row[field])
    return prompts


def _read_csv(path: Path, field: str) -> list[str]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return []
        if field not in reader.fieldnames:
            raise ValueError(f"{path}: no column {field!r} (columns: {reader.fieldnames}); set field=...")
        return [row[field] or "" for row in reader]


def _read_dataset(name: str, field: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency of the engine extra
        raise ImportError(f"{name!r} is not a .txt/.jsonl/.csv file; loading it as a dataset needs `datasets` "
                          "(pip install datasets)") from exc
    ds = datasets.load_dataset(name, split=split)
    if field not in ds.column_names:
        raise ValueError(f"dataset {name!r} (split {split!r}) has no column {field!r} (columns: {ds.column_names}); "
                         "set field=...")
    return list(ds[field])


def load_prompts(
    source: str | os.PathLike | Sequence[str],
    *,
    field: str = "prompt",
    split: str = "train",
    seed: int | None = None,
    limit: int | None = None,
) -> list[str]:
    """Load prompts.

    Args:
        source: a .txt file (one prompt per line), .jsonl (an object per line with `field`, or a string), .csv
            (a header row with column `field`), a `datasets` dataset name or local folder (column `field`,
            split `split`), or a list of strings (returned cleaned).
        field: the JSONL field / CSV column / dataset column holding the prompt.
        split: the dataset split.
        seed: shuffle with random.Random(seed) (deterministic); None keeps the file's order.
        limit: keep the first `limit` prompts (after shuffling).

    Returns:
        list[str], stripped, blank entries dropped. Raises FileNotFoundError for a missing file with a known
        extension, ValueError for an empty source or a missing field / column (naming the line).
    """
    if isinstance(source, (list, tuple)):
        prompts = _clean(list(source), "prompts")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        ext = path.suffix.lower()
        if ext in (".txt", ".jsonl", ".csv"):
            if not path.is_file():
                raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
            rows = _read_txt(path) if ext == ".txt" else _read_jsonl(path, field) if ext == ".jsonl" else \
                _read_csv(path, field)
        elif ext in (".json", ".parquet", ".tsv"):
            raise ValueError(f"prompt file {str(path)!r}: unsupported extension {ext!r}; use .txt, .jsonl or .csv "
                             "(or a datasets dataset)")
        else:
            rows = _read_dataset(str(source), field, split)
        prompts = _clean(rows, str(source))
    else:
        raise TypeError(f"source must be a path, a dataset name or a list of strings, got {type(source).__name__}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        random.Random(seed).shuffle(prompts)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an int >= 1 or None, got {limit!r}")
        prompts = prompts[:limit]
    return prompts


def prompt_batch(prompts: Sequence[str], step: int, batch_size: int, *, seed: int = 0) -> list[str]:
    """The `batch_size` prompts of training step `step` (0-based): consecutive slices of per-epoch
    permutations (epoch e shuffled by random.Random(f"{seed}:{e}")), wrapping into the next epoch.
    A pure function of its arguments, so resuming at any step gives the same batches."""
    if not prompts:
        raise ValueError("prompts is empty")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    n = len(prompts)
    orders: dict[int, list[int]] = {}
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = list(range(n))
            random.Random(f"{seed}:{epoch}").shuffle(orders[epoch])
        out.append(prompts[orders[epoch][i]])
    return out
