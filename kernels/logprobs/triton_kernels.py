"""Triton kernels: log-probability of the label and entropy per row of [B, T, V] logits.

Forward, one program per row, one pass over the vocabulary in BLOCK_V tiles with an online
log-sum-exp: with x = logits / T, running max m, s = sum exp(x - m), u = sum exp(x - m) (x - m),
    lse = m + log s,   H = log s - u / s,   logp = x[label] - lse.
When the max moves from m to m', s and u are rescaled by a = exp(m - m'), and u also gains
(m - m') s, because x - m' = (x - m) + (m - m'). Nothing [N, V] is written: the row statistics lse
and H ([N] fp32) are saved for the backward, which reads the logits once more and writes the
gradient once:
    dlogits = (g_logp (onehot - p) - g_H p (log p + H)) / T,   p = exp(x - lse).
Ignored rows (label == ignore_index) give 0 and a zero gradient; a label outside [0, V) gives NaN
(never an out-of-bounds read).
Logits may be a strided [B, T, V] view (e.g. `logits[:, :-1]`) as long as the vocabulary is contiguous.
"""

from __future__ import annotations

import triton
import triton.language as tl

# 4096 fp32 lanes per tile with 8 warps: 16 values per thread, a tile of 16 KB (bf16: 8 KB).
BLOCK_V = 4096
NUM_WARPS = 8
NEG_BIG = tl.constexpr(-1.0e30)  # a finite "minus infinity" keeps (m - m') * s = 0 before the first tile


@triton.jit
def _row_base(logits_ptr, row, T, stride_b, stride_t):
    b = row // T
    t = row - b * T
    return logits_ptr + b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, entropy_ptr, lse_ptr,
    T, V, stride_b, stride_t, inv_temp, ignore_index,
    WANT_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    base = _row_base(logits_ptr, row, T, stride_b, stride_t)
    m = tl.full([], NEG_BIG, tl.float32)
    s = tl.zeros([], tl.float32)
    u = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(x, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new)  # 0 on masked lanes and at x = -inf
        if WANT_ENTROPY:
            u = alpha * (u + (m - m_new) * s) + tl.sum(e * tl.where(e > 0.0, x - m_new, 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    in_range = (label >= 0) & (label < V)
    x_label = tl.load(base + label, mask=valid & in_range, other=0.0).to(tl.float32) * inv_temp
    # x_label <= lse in exact arithmetic; rounding must not make a log-probability positive
    logp = tl.where(in_range, tl.minimum(x_label - lse, 0.0, propagate_nan=tl.PropagateNan.ALL), float("nan"))
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    tl.store(lse_ptr + row, lse)
    if WANT_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, log_s - u / s, 0.0))


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, labels_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_entropy_ptr, grad_ptr,
    T, V, stride_b, stride_t, inv_temp, ignore_index,
    HAS_G_LOGP: tl.constexpr, HAS_G_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    base = _row_base(logits_ptr, row, T, stride_b, stride_t)
    out = grad_ptr + row.to(tl.int64) * V
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    lse = tl.load(lse_ptr + row)
    g_logp = tl.zeros([], tl.float32)
    g_ent = tl.zeros([], tl.float32)
    entropy = tl.zeros([], tl.float32)
    if HAS_G_LOGP:
        g_logp = tl.where(valid, tl.load(g_logp_ptr + row), 0.0)
    if HAS_G_ENTROPY:
        g_ent = tl.where(valid, tl.load(g_entropy_ptr + row), 0.0)
        entropy = tl.load(entropy_ptr + row)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
        log_p = x - lse
        p = tl.exp(log_p)
        g = tl.where(offs == label, g_logp, 0.0) - g_logp * p
        if HAS_G_ENTROPY:
            g -= g_ent * p * tl.where(p > 0.0, log_p + entropy, 0.0)
        tl.store(out + offs, (g * inv_temp).to(grad_ptr.dtype.element_ty), mask=mask)
