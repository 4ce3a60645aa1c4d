"""Triton kernels of y = silu(g) u, elementwise over contiguous tensors, with s = sigmoid(g):

    forward:  y = round(g s) u                   (round: to the inputs' dtype, as transformers' two ops do)
    backward: du = dy round(g s);  dg = dy u s (1 + g (1 - s))

Nothing is saved between them but the inputs: the backward recomputes s from g.
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 2048
NUM_WARPS = 8  # 8 values per thread: 16-byte bf16 loads


@triton.jit
def _silu_mul_fwd_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(g_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + offs, (a * u).to(y_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _silu_mul_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    dy = tl.load(dy_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    a = (g * s).to(g_ptr.dtype.element_ty).to(tl.float32)
    tl.store(du_ptr + offs, (dy * a).to(du_ptr.dtype.element_ty), mask=inb)
    tl.store(dg_ptr + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=inb)
