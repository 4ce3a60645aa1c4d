"""Prompt lists: from a .txt / .jsonl / .json / .csv / .parquet file or a `datasets` dataset (read by
`engine.prompt_data`), shuffled deterministically.

    train = load_prompts("prompts.jsonl", field="prompt", seed=0)          # list[str], shuffled by seed
    evals = load_prompts("eval.txt")                                        # separate eval prompts, file order
    batch = prompt_batch(train, step=12, batch_size=8, seed=0)              # the prompts of training step 12

`prompt_batch` is a pure function of (step, seed) (`engine.prompt_data.epoch_batch`, shared with the LLM
engine): a run resumed at step k draws exactly the prompts the killed run would have drawn.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence

from ..prompt_data import epoch_batch, read_rows

__all__ = ["DEFAULT_EVAL_PROMPTS", "DEFAULT_PROMPTS", "load_prompts", "prompt_batch", "prompt_metadata"]

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
        source: a .txt file (one prompt per line), .jsonl (an object per line with `field`, or a string), .json,
            .csv (a header row with column `field`), .parquet, a `datasets` dataset name or local folder (column
            `field`, split `split`), or a list of strings (returned cleaned).
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
        rows = read_rows(source, field=field, split=split)
        for row in rows:
            if field not in row:
                fields = sorted(k for k in row if k != "_line")
                where = f"{source}:{row['_line']}" if "_line" in row else str(source)
                raise ValueError(f"{where}: no field {field!r} (fields: {fields}); name the prompt column "
                                 "(`fusedrl train`: prompts.column; load_prompts: field=)")
        prompts = _clean([row[field] if row[field] is not None else "" for row in rows], str(source))
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


def prompt_metadata(sources: Sequence[tuple[str | os.PathLike | Sequence[str] | None, str]], *,
                    field: str = "prompt") -> dict[str, dict]:
    """{prompt: its row's other fields} over `sources`, (source, split) pairs such as the training and the eval
    prompts, for the prompts whose rows have any (.jsonl / .json / .csv / .parquet files and datasets; a .txt file,
    a list or None has none). These reach the rewards that take metadata (`fusedrl.engine.rewards.function`), e.g.
    the objects a GenEval-style reward counts or the text an OCR reward reads: the trainers read them only when
    such a reward is configured. A prompt whose rows carry different fields (in one source or across them) raises
    ValueError naming both rows: the reward could not tell which applies."""
    found: dict[str, tuple[dict, str, str]] = {}  # prompt -> (fields, their JSON for comparing, where)
    for source, split in sources:
        if source is None or isinstance(source, (list, tuple)) or str(source).lower().endswith(".txt"):
            continue
        for i, row in enumerate(read_rows(source, field=field, split=split)):
            prompt = row.get(field)
            if not isinstance(prompt, str) or not prompt.strip():
                continue
            extra = {k: v for k, v in row.items() if k not in (field, "_line")}
            key, where = prompt.strip(), f"{source}:{row['_line']}" if "_line" in row else f"{source}[{i}]"
            text = json.dumps(extra, sort_keys=True, default=str)  # NaN == NaN here, unlike in dict comparison
            if key in found and found[key][1] != text:
                raise ValueError(f"{where}: the prompt {key!r} also appears at {found[key][2]} with other fields "
                                 f"({found[key][0]} vs {extra}); a reward taking metadata could not tell which "
                                 "applies (make the prompts unique, or drop the fields that differ)")
            found.setdefault(key, (extra, text, where))
    return {k: extra for k, (extra, _, _) in found.items() if extra}


def prompt_batch(prompts: Sequence[str], step: int, batch_size: int, *, seed: int = 0) -> list[str]:
    """The `batch_size` prompts of training step `step` (0-based): `engine.prompt_data.epoch_batch`."""
    return epoch_batch(prompts, step, batch_size, seed=seed)
