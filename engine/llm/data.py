"""Prompt records for LLM GRPO: a prompt and, for verifiable rewards, its reference answer.

    records = load_prompt_records("train.jsonl", prompt_field="question", answer_field="answer", seed=0)
    batch = prompt_batch(records, step=12, per_step=8, seed=0)            # the records of training step 12

Sources (read by `engine.prompt_data.read_rows`, shared with the diffusion engine): a .jsonl / .json file (an
object per line, or a JSON list of objects), .txt (a prompt per line), a .csv file (a header row), a .parquet
file (needs pandas or pyarrow), a `datasets` dataset name or a folder saved with `save_to_disk`, or a Python
list of strings / dicts / (prompt, answer) pairs.

`prompt_batch` is a pure function of (step, seed) (`engine.prompt_data.epoch_batch`): a run resumed at step k
draws exactly the prompts the killed run would have drawn.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..prompt_data import epoch_batch, read_rows

__all__ = ["PromptRecord", "load_prompt_records", "prompt_batch"]


@dataclass(frozen=True)
class PromptRecord:
    """One training prompt and its reference answer (None when the data has none)."""

    prompt: str
    answer: Any = None


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
        records = _records(read_rows(source, field=prompt_field, split=split), prompt_field, answer_field,
                           str(source))
    else:
        raise TypeError(f"prompts source must be a path, a dataset name or a list; got {type(source).__name__}")
    if seed is not None:
        random.Random(seed).shuffle(records)
    if limit is not None:
        records = records[:limit]
    return records


def prompt_batch(records: Sequence[PromptRecord], step: int, per_step: int, seed: int) -> list[PromptRecord]:
    """The `per_step` records of training step `step` (>= 1): `engine.prompt_data.epoch_batch` of batch
    step - 1, so the batch of any step is known without replaying the earlier ones."""
    return epoch_batch(records, step - 1, per_step, seed=seed)
