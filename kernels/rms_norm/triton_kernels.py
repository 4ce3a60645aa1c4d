"""Triton kernels of RMSNorm over rows of length H (the last dimension), with r = rsqrt(mean(x^2) + eps):

    forward:  y = w * round_x(x r)                      (round_x: to x's dtype, as transformers does)
    backward: g = dy w;  dx = r (g - x r mean(g x r));  dw = sum over rows of dy round_x(x r)

The forward keeps r ([N] fp32) for the backward, which reads x again rather than a saved normalized copy.
Backward programs each take ROWS consecutive rows and write their partial dw to one row of a [programs, H] fp32
buffer, summed by the host: no atomics, a deterministic sum. With a frozen weight (LoRA) each program takes one row.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Backward programs: about this many, each over ceil(N / BWD_PROGRAMS) rows (a [programs, H] fp32 dw buffer: 16 MB
# at H = 4096); enough to fill any GPU, few enough that summing the partial dw costs little.
BWD_PROGRAMS = 1024


def block_h(H: int) -> int:
    return triton.next_power_of_2(max(H, 1))


def num_warps(H: int) -> int:
    """Warps per row: one row of BLOCK_H values over 32 x warps threads, 8 values each up to H = 4096 (4 at
    H = 128), then 16 warps: 16 values each at H = 8192, 32 at 16384, where the backward spills registers on sm_90
    (tests/test_triton_compile.py: 4 warps of 16 values each spilled at H = 2048 with Triton 3.6; 32 warps cap a
    thread at 64 registers and spilled from H = 8192)."""
    return max(1, min(16, block_h(H) // 256))


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, H, stride_x, stride_y, eps, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    inb = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=inb, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    xhat = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=inb, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * xhat).to(y_ptr.dtype.element_ty), mask=inb)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, N, H, ROWS, stride_dy, stride_x,
                         HAS_DW: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    inb = cols < H
    dw = tl.zeros([BLOCK_H], tl.float32)
    for i in range(ROWS):
        row = pid.to(tl.int64) * ROWS + i
        live = inb & (row < N)
        w = tl.load(w_ptr + cols, mask=inb, other=0.0).to(tl.float32)  # per row (cached): fewer live registers
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=live, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * stride_x + cols, mask=live, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < N, other=0.0)
        xhat = x * rstd
        g = dy * w
        dx = (g - xhat * (tl.sum(g * xhat, axis=0) / H)) * rstd
        tl.store(dx_ptr + row * H + cols, dx.to(dx_ptr.dtype.element_ty), mask=live)
        if HAS_DW:
            dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
    if HAS_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * H + cols, dw, mask=inb)
