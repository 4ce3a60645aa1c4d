"""Triton kernel of the rotary embedding, half-split layout, for x [B, H, S, D] (any strides, D contiguous) and
cos, sin [B, S, D]; with x1, x2 the halves of a head's vector and c1, c2, s1, s2 those of cos and sin:

    forward:  y1 = x1 c1 - x2 s1;  y2 = x2 c2 + x1 s2
    backward: dx1 = dy1 c1 + dy2 s2;  dx2 = dy2 c2 - dy1 s1   (the forward with s1, s2 -> -s2, -s1)

One program per token (b, s): cos and sin are read once for all H heads. Math in fp32, one rounding on store
(transformers rounds the two products and their sum: within an ulp of this).
"""

from __future__ import annotations

import triton
import triton.language as tl


def blocks(H: int, D: int) -> tuple[int, int]:
    return triton.next_power_of_2(max(H, 1)), triton.next_power_of_2(max(D // 2, 1))


def num_warps(H: int, D: int) -> int:
    """Warps of one token's program: 8 values of each half per thread (Qwen2.5-1.5B's 12 x 128 queries: 4 warps)."""
    block_h, block_d2 = blocks(H, D)
    return max(1, min(16, block_h * block_d2 // 256))


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, S, H, D2,
                   sx_b, sx_h, sx_s, sy_b, sy_h, sy_s, sc_b, sc_s, ss_b, ss_s,
                   BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D2: tl.constexpr):
    token = tl.program_id(0)
    b = (token // S).to(tl.int64)
    s = (token % S).to(tl.int64)
    d = tl.arange(0, BLOCK_D2)
    h = tl.arange(0, BLOCK_H)
    dm = d < D2
    c_row = cos_ptr + b * sc_b + s * sc_s
    s_row = sin_ptr + b * ss_b + s * ss_s
    c1 = tl.load(c_row + d, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + D2 + d, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(s_row + d, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + D2 + d, mask=dm, other=0.0).to(tl.float32)
    if BACKWARD:
        s1, s2 = -s2, -s1
    m = (h[:, None] < H) & dm[None, :]
    x_at = x_ptr + b * sx_b + s * sx_s + h[:, None].to(tl.int64) * sx_h + d[None, :]
    x1 = tl.load(x_at, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + D2, mask=m, other=0.0).to(tl.float32)
    y_at = y_ptr + b * sy_b + s * sy_s + h[:, None].to(tl.int64) * sy_h + d[None, :]
    tl.store(y_at, (x1 * c1[None, :] - x2 * s1[None, :]).to(y_ptr.dtype.element_ty), mask=m)
    tl.store(y_at + D2, (x2 * c2[None, :] + x1 * s2[None, :]).to(y_ptr.dtype.element_ty), mask=m)
