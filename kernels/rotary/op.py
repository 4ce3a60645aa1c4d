"""Custom op `fusedrl::rotary` over the Triton kernel (forward, or backward with `backward=True`), paired for
autograd by `RotaryFunction`. Layout: x [B, H, S, D] with D contiguous (other strides free: the usual
`view(B, S, H, D).transpose(1, 2)` of a projection's output needs no copy), cos and sin [B, S, D] with D
contiguous (a batch stride of 0, one table for every row, is fine)."""

from __future__ import annotations

import torch

from ..device_guard import on_inputs_device
from . import triton_kernels as tk


@torch.library.custom_op("fusedrl::rotary", mutates_args=())
@on_inputs_device
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """-> y (or dx) [B, H, S, D], laid out as x, in the promoted dtype of x and cos."""
    B, H, S, D = x.shape
    y = torch.empty_like(x, dtype=torch.promote_types(x.dtype, cos.dtype))
    if x.numel():
        block_h, block_d2 = tk.blocks(H, D)
        tk._rotary_kernel[(B * S,)](x, cos, sin, y, S, H, D // 2, x.stride(0), x.stride(1), x.stride(2), y.stride(0),
                                    y.stride(1), y.stride(2), cos.stride(0), cos.stride(1), sin.stride(0),
                                    sin.stride(1), BACKWARD=backward, BLOCK_H=block_h, BLOCK_D2=block_d2,
                                    num_warps=tk.num_warps(H, D))
    return y


@rotary.register_fake
def _(x, cos, sin, backward):
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, cos.dtype))


class RotaryFunction(torch.autograd.Function):
    """(x [B, H, S, D], cos, sin [B, S, D]) -> the rotated x; cos and sin get no gradient."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return rotary(x, cos, sin, False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        return rotary(dy, cos, sin, True).to(ctx.x_dtype), None, None
