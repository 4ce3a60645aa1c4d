"""Rewards of LLM GRPO: registered text rewards (`fusedrl.engine.rewards`) and any Python callable, combined with
weights.

A callable is called as TRL calls its reward functions, with keyword arguments, when its signature takes them:
`fn(completions=[...], prompts=[...], answers=[...])` (also `answer=` / `completion_ids=` if it names them, and
anything under **kwargs); a function of one positional parameter gets the completions only. It returns a number
(or None, meaning "not applicable": NaN, which the NaN guard then reports) per completion, as a list or tensor.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..rewards.function import import_function

__all__ = ["RewardTerm", "build_reward_terms", "check_answers", "score"]


@dataclass
class RewardTerm:
    """One reward: a display name, the function, its weight."""

    name: str
    fn: Callable
    weight: float = 1.0


def build_reward_terms(names: Sequence[str] = (), function: str | Callable | None = None,
                       weights: Sequence[float] | None = None, options: dict[str, dict] | None = None,
                       device: str | torch.device | None = None) -> list[RewardTerm]:
    """Registered rewards by name (with their factory options), then the function; weights default to 1."""
    from ..rewards import load_reward

    terms = []
    for name in names:
        opts = dict((options or {}).get(name, {}))
        path = opts.pop("path", None)
        if device is not None and name.replace("-", "_").lower() == "sequence_classification":
            opts.setdefault("device", device)
        reward = load_reward(name, path, **opts)
        if getattr(reward, "modality", "text") != "text":
            raise ValueError(f"reward {name!r} scores {reward.modality}s, not text; LLM GRPO needs text rewards")
        terms.append(RewardTerm(name, reward))
    if function is not None:
        fn = import_function(function, "reward.function") if isinstance(function, str) else function
        terms.append(RewardTerm(getattr(fn, "__name__", "function"), fn))
    if not terms:
        raise ValueError("no reward: give reward.names and/or reward.function")
    if weights is not None:
        if len(weights) != len(terms):
            raise ValueError(f"reward.weights: {len(weights)} weights for {len(terms)} rewards")
        for term, w in zip(terms, weights):
            term.weight = float(w)
    seen: dict[str, int] = {}
    for term in terms:  # unique metric names
        seen[term.name] = seen.get(term.name, 0) + 1
        if seen[term.name] > 1:
            term.name = f"{term.name}_{seen[term.name]}"
    return terms


def check_answers(terms: Sequence[RewardTerm], records: Sequence[Any], what: str) -> None:
    """ValueError naming the first reward that needs reference answers when some of `records` (prompt records,
    `what`: where they come from) have none (or an empty one: a blank CSV cell), or one the reward cannot use
    (its `reference_error`, e.g. numeric_answer's answer with no number): found before the model loads, not
    when that prompt is first drawn, maybe hours into a run."""
    for term in terms:
        if not getattr(term.fn, "needs_answers", False):
            continue
        missing = [i for i, r in enumerate(records)
                   if r.answer is None or (isinstance(r.answer, str) and not r.answer.strip())]
        if missing:
            raise ValueError(f"the {term.name} reward needs reference answers, and {len(missing)} of the "
                             f"{len(records)} {what} have none or an empty one (the first: record {missing[0]}, "
                             f"prompt {records[missing[0]].prompt!r}): set prompts.answer_field to the answer column, "
                             "fill them in (or choose a reward that needs no answers)")
        check = getattr(term.fn, "reference_error", None)
        for i, r in enumerate(records) if check is not None else ():
            if (problem := check(r.answer)) is not None:
                raise ValueError(f"the {term.name} reward cannot use the answer of record {i} of the {what} "
                                 f"(prompt {r.prompt!r}): {problem}")


def _call(fn: Callable, completions: list[str], prompts: list[str], answers: list, completion_ids: list) -> Any:
    from ..rewards.base import Reward

    if isinstance(fn, Reward):
        needs = getattr(fn, "needs_answers", False)
        if needs and any(a is None for a in answers):
            raise ValueError(f"the {fn.name} reward needs reference answers, and some prompts have none (set "
                             "prompts.answer_field to the answer column)")
        return fn(completions, prompts, answers if needs or all(a is not None for a in answers) else None)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(completions, prompts=prompts, answers=answers)
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    offered = {"completions": completions, "prompts": prompts, "answers": answers, "answer": answers,
               "completion_ids": completion_ids}
    kwargs = {k: v for k, v in offered.items() if k in params or (var_kw and k != "answer")}
    if "completions" in kwargs or var_kw:
        return fn(**kwargs)
    positional = [p for p in params.values() if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                            inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if len(positional) == 1:
        return fn(completions)
    return fn(completions, prompts, answers)


def _number(value: Any) -> float:
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        value = value.item()  # numpy / 0-dim tensor
    return float(value) if isinstance(value, (int, float)) else math.nan


def score(terms: Sequence[RewardTerm], completions: list[str], prompts: list[str], answers: list,
          completion_ids: list | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total [N] fp32 = sum of weight * reward, {name: [N] fp32}). None or non-numbers become NaN (the trainer's
    guard skips such a step and says which reward produced it)."""
    n = len(completions)
    per: dict[str, torch.Tensor] = {}
    total = torch.zeros(n, dtype=torch.float32)
    for term in terms:
        raw = _call(term.fn, completions, prompts, answers, completion_ids or [])
        if isinstance(raw, torch.Tensor):
            values = raw.detach().to("cpu", torch.float32).reshape(-1)
        else:
            values = torch.tensor([_number(v) for v in raw], dtype=torch.float32)
        if values.numel() != n:
            raise ValueError(f"reward {term.name!r} returned {values.numel()} values for {n} completions")
        per[term.name] = values
        total = total + term.weight * values
    return total, per
