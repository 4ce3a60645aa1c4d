"""Custom ops `fusedrl::rms_norm_fwd` / `fusedrl::rms_norm_bwd` over the Triton kernels, paired for autograd by
`RMSNormFunction`. Layout: x [N, H] with a contiguous last dimension (rows may be strided), weight [H]."""

from __future__ import annotations

import torch

from ..device_guard import on_inputs_device
from . import triton_kernels as tk

EMPTY = (0,)


@torch.library.custom_op("fusedrl::rms_norm_fwd", mutates_args=())
@on_inputs_device
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (y [N, H] in the promoted dtype of x and weight, rstd [N] fp32)."""
    N, H = x.shape
    y = torch.empty((N, H), device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
    rstd = torch.empty((N,), device=x.device, dtype=torch.float32)
    if N:
        tk._rms_norm_fwd_kernel[(N,)](x, weight, y, rstd, H, x.stride(0), y.stride(0), eps,
                                      BLOCK_H=tk.block_h(H), num_warps=tk.num_warps(H))
    return y, rstd


@rms_norm_fwd.register_fake
def _(x, weight, eps):
    N, H = x.shape
    return (x.new_empty((N, H), dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty((N,), dtype=torch.float32))


@torch.library.custom_op("fusedrl::rms_norm_bwd", mutates_args=())
@on_inputs_device
def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 want_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx [N, H] in x's dtype, dweight [H] in weight's dtype, or empty when not wanted)."""
    N, H = x.shape
    dx = torch.empty((N, H), device=x.device, dtype=x.dtype)
    rows = max(1, -(-N // tk.BWD_PROGRAMS)) if want_dw else 1  # a frozen weight: one row per program
    programs = -(-N // rows)
    partial = torch.empty((programs, H) if want_dw else EMPTY, device=x.device, dtype=torch.float32)
    if N:
        tk._rms_norm_bwd_kernel[(programs,)](dy, x, weight, rstd, dx, partial if want_dw else dx, N, H, rows,
                                             dy.stride(0), x.stride(0), HAS_DW=want_dw, BLOCK_H=tk.block_h(H),
                                             num_warps=tk.num_warps(H))
    if not want_dw:
        return dx, weight.new_empty(EMPTY)
    return dx, partial.sum(0).to(weight.dtype)  # N = 0: a sum over no rows, zeros


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, want_dw):
    return x.new_empty(x.shape), weight.new_empty(weight.shape if want_dw else EMPTY)


class RMSNormFunction(torch.autograd.Function):
    """(x [N, H], weight [H]) -> y [N, H]; the backward reads x again with the saved rstd [N]."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rms_norm_fwd(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx, dw = rms_norm_bwd(dy, x, weight, rstd, ctx.needs_input_grad[1])
        return dx, (dw if ctx.needs_input_grad[1] else None), None
