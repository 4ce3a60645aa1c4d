"""Custom ops `fusedrl::silu_mul_fwd` / `fusedrl::silu_mul_bwd` over the Triton kernels, paired for autograd by
`SiluMulFunction`. Inputs: gate and up of one shape and dtype, contiguous."""

from __future__ import annotations

import torch

from ..device_guard import on_inputs_device
from . import triton_kernels as tk


def _grid(n: int) -> tuple[int]:
    return (-(-n // tk.BLOCK),)


@torch.library.custom_op("fusedrl::silu_mul_fwd", mutates_args=())
@on_inputs_device
def silu_mul_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(gate)
    if gate.numel():
        tk._silu_mul_fwd_kernel[_grid(gate.numel())](gate, up, y, gate.numel(), BLOCK=tk.BLOCK,
                                                     num_warps=tk.NUM_WARPS)
    return y


@silu_mul_fwd.register_fake
def _(gate, up):
    return torch.empty_like(gate)


@torch.library.custom_op("fusedrl::silu_mul_bwd", mutates_args=())
@on_inputs_device
def silu_mul_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (d gate, d up), in the inputs' dtype."""
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    if gate.numel():
        tk._silu_mul_bwd_kernel[_grid(gate.numel())](dy, gate, up, dg, du, gate.numel(), BLOCK=tk.BLOCK,
                                                     num_warps=tk.NUM_WARPS)
    return dg, du


@silu_mul_bwd.register_fake
def _(dy, gate, up):
    return torch.empty_like(gate), torch.empty_like(up)


class SiluMulFunction(torch.autograd.Function):
    """(gate, up) -> silu(gate) * up; the backward recomputes silu(gate)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return silu_mul_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return silu_mul_bwd(dy.contiguous(), gate, up)
