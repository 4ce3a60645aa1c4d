"""Each provider's output against eager's, before its time is published.

The first (warm-up) call's output is reduced to a fingerprint: per tensor (in order; dicts by key) its shape,
float64 sum, sum of absolute values and norm. Nothing large is kept, so the check costs no memory that the
timed calls would see. A provider whose tensors have eager's shapes but whose sums or norm differ by more
than the dtype's tolerance, relative to eager's sum of absolute values / norm, fails its row: a GPU-only
kernel bug must not be published as a speed-up. Outputs laid out otherwise but with as many elements (eager's
[B*T] against [B, T], a list of B [1] scores against one [B]) are compared as one flat output; others (a peer
returning what eager does not) are not compared, and the row's note says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch

# relative tolerances on sums and norms: fp32 math against fp32 math; 16-bit outputs (and training steps in
# them, whose gradients go through many roundings)
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
TOLERANCE_16BIT = 5e-2


class Print(NamedTuple):
    shape: tuple[int, ...]
    total: float
    abs_total: float
    norm: float


def _tensors(out: object) -> Iterator[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        for key in sorted(out, key=str):
            yield from _tensors(out[key])
    elif isinstance(out, (list, tuple)):
        for item in out:
            yield from _tensors(item)


def fingerprint(out: object) -> list[Print]:
    """The fingerprint of a call's output (its tensors: a tensor, or tensors in lists, tuples and dicts)."""
    prints = []
    for t in _tensors(out):
        d = t.detach().double()
        prints.append(Print(tuple(t.shape), d.sum().item(), d.abs().sum().item(), d.norm().item()))
    return prints


def _numel(p: Print) -> int:
    return math.prod(p.shape)


def _flat(prints: list[Print]) -> list[Print]:
    """The fingerprint of all of `prints`' tensors as one flat tensor."""
    n = sum(_numel(p) for p in prints)
    return [Print((n,), sum(p.total for p in prints), sum(p.abs_total for p in prints),
                  sum(p.norm ** 2 for p in prints) ** 0.5)]


def compare(got: list[Print], want: list[Print], dtype: torch.dtype) -> tuple[bool | None, str]:
    """(True: agrees, False: differs, None: not comparable; and what to put in the row's note)."""
    note = ""
    if [p.shape for p in got] != [p.shape for p in want]:
        if not want or sum(map(_numel, got)) != sum(map(_numel, want)):
            return None, "output not compared with eager's (another structure)"
        got, want, note = _flat(got), _flat(want), "output compared with eager's as one flat tensor"
    tol = TOLERANCE.get(dtype, TOLERANCE_16BIT)
    worst = 0.0
    for g, w in zip(got, want):
        if not all(map(_finite, (g.total, g.norm))) and all(map(_finite, (w.total, w.norm))):
            return False, "output has NaN/inf where eager's has none"
        worst = max(worst, abs(g.total - w.total) / max(w.abs_total, 1e-30), abs(g.norm - w.norm) / max(w.norm, 1e-30))
    if worst > tol:
        return False, f"output differs from eager's: relative {worst:.2g} > {tol:g}"
    return True, note


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
