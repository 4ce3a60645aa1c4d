"""Public RMSNorm: validation, dispatch."""

from __future__ import annotations

import math

import torch

from .. import dispatch
from . import reference
from .op import RMSNormFunction

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

SPEC = dispatch.register_op(
    dispatch.OpSpec(name="rms_norm", backends=(dispatch.Backend.TORCH, dispatch.Backend.TRITON))
)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension, as transformers' Llama / Qwen2 / Qwen3 / Mistral RMSNorm compute it.

    Args:
        x: [..., H] fp32/fp16/bf16 activations (math in fp32).
        weight: [H] scale, on x's device; fp32 weights over bf16 activations are fine (the output is then fp32,
            as in transformers).
        eps: added to the mean square.

    Returns:
        y [..., H] in the promoted dtype of x and weight. Differentiable in x and weight; the backward reads x
        again (nothing [..., H] is saved besides x) and skips dweight when weight does not require grad.

    Equivalent PyTorch:
        h = x.float(); h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * h.to(x.dtype)
    """
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOATS:
            raise TypeError(f"{name} must be a floating-point tensor (fp16, bf16, fp32 or fp64), got {t.dtype}")
    if x.ndim < 1 or weight.ndim != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have shape [H] = [{x.shape[-1] if x.ndim else '?'}] (x's last dimension), "
                         f"got weight {tuple(weight.shape)} for x {tuple(x.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    backend = dispatch.select(SPEC, [x, weight])
    if backend is dispatch.Backend.TORCH or x.shape[-1] == 0:  # H = 0: an empty result, no rows to view
        return reference.rms_norm(x, weight, float(eps))
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return RMSNormFunction.apply(x2, weight.contiguous(), float(eps)).view(*x.shape[:-1], H)
