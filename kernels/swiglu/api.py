"""Public silu(gate) * up: validation, dispatch."""

from __future__ import annotations

import torch

from .. import dispatch
from . import reference
from .op import SiluMulFunction

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

SPEC = dispatch.register_op(
    dispatch.OpSpec(name="silu_mul", backends=(dispatch.Backend.TORCH, dispatch.Backend.TRITON))
)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gated activation silu(gate) * up in one pass, as transformers' Llama / Qwen2 / Mistral MLPs do it.

    Args:
        gate, up: [...] tensors of one shape, dtype (fp32/fp16/bf16; math in fp32) and device: the outputs of the
            MLP's gate and up projections.

    Returns:
        [...] in their dtype, differentiable in both. Nothing is saved for the backward but gate and up (autograd
        of the two-op formula also keeps silu(gate), one more tensor of the MLP's width).

    Equivalent PyTorch: torch.nn.functional.silu(gate) * up
    """
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOATS:
            raise TypeError(f"{name} must be a floating-point tensor (fp16, bf16, fp32 or fp64), got {t.dtype}")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"gate and up must have one shape, dtype and device; got gate {tuple(gate.shape)} "
                         f"{gate.dtype} on {gate.device}, up {tuple(up.shape)} {up.dtype} on {up.device}")
    backend = dispatch.select(SPEC, [gate, up])
    if backend is dispatch.Backend.TORCH:
        return reference.silu_mul(gate, up)
    return SiluMulFunction.apply(gate.contiguous(), up.contiguous())
