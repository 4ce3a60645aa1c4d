"""silu(gate) * up as transformers' LlamaMLP / Qwen2MLP write it (`act_fn(gate_proj(x)) * up_proj(x)`): silu's
result rounded to the inputs' dtype, then the product."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
