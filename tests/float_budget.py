"""The error budget of the backbone ops' tests: a kernel's error against the float64 reference may be at most a
small multiple of the same-dtype torch formula's error (DESIGN.md), plus a couple of ulps of the output."""

from __future__ import annotations

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def budget(base_err: float, exp: torch.Tensor, dtype: torch.dtype) -> float:
    scale = max(1.0, exp.abs().max().item()) if exp.numel() else 1.0
    return 4 * base_err + 2 * torch.finfo(dtype).eps * scale + 1e-6 * scale
