"""Triton kernels of flash attention: forward with an online softmax, backward in three kernels.

Layout: q [B, Hq, Nq, D], k / v [B, Hkv, Nkv, D], any strides with the head dim contiguous (the
launcher in `op.py` passes the batch, head and row strides); out / dq / dk / dv are written
contiguous; lse and delta are [B, Hq, Nq] fp32 contiguous. Query head h reads key/value head
h // GROUP (GROUP = Hq // Hkv). All offsets are int64.

Masking (shared with `reference.py`): causal aligned bottom-right, query i sees key j iff
j <= i + (Nkv - Nq); key_padding_mask (loaded as uint8, 1 = real key); keys beyond Nkv. A row that
sees no key gets out = 0, lse = -inf; its backward sees lse = -inf and treats it as +inf, so that
p = exp(s - lse) = 0 and the row passes no gradient.

Forward, one program per (BLOCK_M query rows, batch x query head): for each BLOCK_N tile of keys,
s = q k^T * scale (fp32 from `tl.dot`), an online softmax in base 2 (exp2 of s * log2(e)),
acc = acc * alpha + p v. Nothing [Nq, Nkv] exists; out (input dtype) and lse (fp32, natural log)
are written. The key loop runs in two stages: tiles that every row of the block sees entirely
(no mask but the key padding mask), then the edge tiles (sequence end, causal diagonal) with the
full mask. Causal tiles above the diagonal are never visited.

Backward (the FlashAttention-2 scheme, no atomics, deterministic):
1. `_attn_bwd_preprocess_kernel`: delta_i = sum_d dO_id O_id - dlse_i (dlse is the gradient that
   reaches the returned lse, usually none), fp32.
2. `_attn_bwd_dkdv_kernel`, one program per (BLOCK_N keys, batch x kv head): it keeps its K, V tile
   and dK, dV accumulators (fp32) in registers and loops over the GROUP query heads of its kv head
   and over the query blocks that see its keys (causal: from the diagonal down), recomputing
   p^T = exp2(k q^T * scale*log2e - lse*log2e), dV += p^T dO, dp^T = v dO^T,
   ds^T = p^T (dp^T - delta), dK += ds^T q. GQA thus sums over the group inside one program and
   dK / dV are written once, in the input dtype.
3. `_attn_bwd_dq_kernel`, one program per (BLOCK_M query rows, batch x query head), loops over keys
   as the forward does: dQ += ds k.
The scores are recomputed twice (once per backward kernel: 7 matmuls of [BLOCK x BLOCK x D] per
tile pair against 5 for a single kernel with atomic dQ). Chosen because it needs no fp32 dQ buffer
and no atomics, gives bit-reproducible gradients, and has GQA accumulate without contention.

Precision: loads in the input dtype, `tl.dot` with fp32 accumulation, softmax statistics in fp32,
casts on store. fp16/bf16 p and ds are cast to the input dtype before their matmuls (as flash-attn
does). fp32 inputs: `DOT_PRECISION` is chosen per call by the launcher from torch's own setting
(`torch.backends.cuda.matmul.allow_tf32`, i.e. `torch.set_float32_matmul_precision`): "ieee" by
default, as torch's fp32 matmul, "tf32" when the user allowed TF32 for matmuls. The interpreter
computes in exact fp32 either way.

Head dims: any D <= 256 through a power-of-two BLOCK_D >= 16 with masked loads/stores (D = 40
computes on 64 columns, 80 / 96 on 128, 160 on 256). D is a constexpr (one compile per head dim): as
a run-time argument it is specialized only when a multiple of 16, and at D = 40 the `d < D` load masks
kept Triton from proving 16-byte runs: the forward and dQ kernels compiled with no cp.async pipelining
and element-wise global loads (seen in the sm_90 builds).

Written for Triton 3.6 - 3.8: no `tl.make_block_ptr`, no libdevice, plain pointer arithmetic.
"""

from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # Python floats for the launcher; the kernels read the constexpr copies
LN2 = 0.6931471805599453
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)
NEG_BIG = tl.constexpr(-1.0e30)  # a finite start for the running max: exp2(m - m') stays 1, never NaN


@triton.jit
def _row_block(N, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """(batch x head index, block index) of this program in a 1-D grid of B * H * cdiv(N, BLOCK) programs.

    1-D because grid axes 1 and 2 stop at 65535 (B * H passes that for big batches of small models);
    consecutive programs share a head, so its K / V stay in L2. REVERSE (causal forward and dQ) starts
    the longest rows first, which shortens the tail of the launch.
    """
    num = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    blk = pid % num
    if REVERSE:
        blk = num - 1 - blk
    return pid // num, blk


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, rows, dd, d_ok, lo, hi, Nkv,
               off, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Fold the key tiles [lo, hi) into the running (acc, l, m) of one block of query rows."""
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < Nkv
        # K^T tile [BLOCK_D, BLOCK_N] read straight from K's rows
        kt = tl.load(k_base + cols[None, :].to(tl.int64) * stride_kn + dd[:, None],
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        if MASKED:
            keep = col_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None] + off)
            s = tl.where(keep, s, float("-inf"))
        if HAS_KPM:
            real = tl.load(kpm_base + cols, mask=col_ok, other=0)
            s = tl.where(real[None, :] != 0, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vn + dd[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, kpm_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on, stride_kpmb,
    Hq, Nq, Nkv, D: tl.constexpr, GROUP, qk_scale,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m = _row_block(Nq, CAUSAL, BLOCK_M)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < Nq
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None].to(tl.int64) * stride_qn + dd[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    kpm_base = kpm_ptr + b * stride_kpmb

    off = Nkv - Nq
    if CAUSAL:
        # keys [0, full) are seen by every row of the block; [full, hi) only by some
        hi = tl.maximum(tl.minimum(Nkv, m0 + BLOCK_M + off), 0)
        full = tl.maximum(tl.minimum(Nkv, m0 + off + 1), 0)
        full = (full // BLOCK_N) * BLOCK_N
    else:
        hi = Nkv
        full = (Nkv // BLOCK_N) * BLOCK_N

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.zeros([BLOCK_M], tl.float32) + NEG_BIG
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, rows, dd, d_ok,
                               0, full, Nkv, off, qk_scale, False, CAUSAL, HAS_KPM, DOT_PRECISION, BLOCK_N)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, rows, dd, d_ok,
                               full, hi, Nkv, off, qk_scale, True, CAUSAL, HAS_KPM, DOT_PRECISION, BLOCK_N)

    empty = l_i == 0.0  # the row saw no key
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i * _LN2 + tl.log(l_safe))
    tl.store(o_ptr + b * stride_ob + h * stride_oh + rows[:, None].to(tl.int64) * stride_on + dd[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * Nq + rows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    o_ptr, do_ptr, dlse_ptr, delta_ptr,
    stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
    Hq, Nq, D: tl.constexpr,
    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m = _row_block(Nq, False, BLOCK_M)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Nq
    dd = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (dd < D)[None, :]
    r64 = rows[:, None].to(tl.int64)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + r64 * stride_on + dd[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + r64 * stride_don + dd[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    idx = pid_bh.to(tl.int64) * Nq + rows
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + idx, mask=row_ok, other=0.0)
    tl.store(delta_ptr + idx, delta, mask=row_ok)


@triton.jit
def _load_lse2(lse_ptr, rows, row_ok):
    """lse in log2 units, with +inf for rows past Nq and rows that saw no key (so that p = 0 there)."""
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse) * _LOG2E


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, cols, keep_col, dd,
                d_ok, lo, hi, Nq, off, qk_scale,
                MASKED: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """Add the query blocks [lo, hi) of one query head to the dK, dV of one key block (transposed math)."""
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < Nq
        r64 = rows[:, None].to(tl.int64)
        q = tl.load(q_base + r64 * stride_qn + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_base + r64 * stride_don + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse2 = _load_lse2(lse_base, rows, row_ok)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        pt = tl.exp2(st - lse2[None, :])
        if MASKED:  # the causal diagonal
            pt = tl.where(cols[:, None] <= rows[None, :] + off, pt, 0.0)
        pt = tl.where(keep_col[:, None], pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, kpm_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_kpmb,
    Hq, Hkv, Nq, Nkv, D: tl.constexpr, GROUP, qk_scale, scale,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_n = _row_block(Nkv, False, BLOCK_N)  # causal: the first key blocks (most work) start first
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < Nkv
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    kv_mask = col_ok[:, None] & d_ok[None, :]
    c64 = cols[:, None].to(tl.int64)
    k = tl.load(k_ptr + b * stride_kb + hk * stride_kh + c64 * stride_kn + dd[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + hk * stride_vh + c64 * stride_vn + dd[None, :], mask=kv_mask, other=0.0)
    keep_col = col_ok
    if HAS_KPM:
        keep_col = keep_col & (tl.load(kpm_ptr + b * stride_kpmb + cols, mask=col_ok, other=0) != 0)

    off = Nkv - Nq
    if CAUSAL:
        # query i sees key j iff i >= j - off: rows below `first` see none of this block's keys, rows from
        # `full` on see all of them; the blocks in between straddle the diagonal and are masked.
        first = tl.maximum(n0 - off, 0)
        lo = (first // BLOCK_M) * BLOCK_M
        full = tl.maximum(n0 + BLOCK_N - 1 - off, 0)
        full = tl.maximum(((full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo)
        mid = tl.minimum(full, Nq)
    else:
        lo = 0
        full = 0
        mid = 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * Hq + h
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        lse_base = lse_ptr + bh * Nq
        delta_base = delta_ptr + bh * Nq
        if CAUSAL:
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, cols,
                                 keep_col, dd, d_ok, lo, mid, Nq, off, qk_scale, True, HAS_KPM, DOT_PRECISION,
                                 BLOCK_M)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, cols,
                             keep_col, dd, d_ok, full, Nq, Nq, off, qk_scale, False, HAS_KPM, DOT_PRECISION, BLOCK_M)

    # dk and dv are written contiguous [B, Hkv, Nkv, D]
    out = (b * Hkv + hk) * Nkv * D + c64 * D + dd[None, :]
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, kpm_base, stride_kn, stride_vn, rows, dd, d_ok, lo, hi, Nkv,
              off, qk_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_N: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < Nkv
        c64 = cols[:, None].to(tl.int64)
        k = tl.load(k_base + c64 * stride_kn + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + c64 * stride_vn + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            keep = col_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None] + off)
            p = tl.where(keep, p, 0.0)
        if HAS_KPM:
            real = tl.load(kpm_base + cols, mask=col_ok, other=0)
            p = tl.where(real[None, :] != 0, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, kpm_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_kpmb,
    Hq, Nq, Nkv, D: tl.constexpr, GROUP, qk_scale, scale,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_m = _row_block(Nq, CAUSAL, BLOCK_M)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < Nq
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < D
    r64 = rows[:, None].to(tl.int64)
    mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + r64 * stride_qn + dd[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + r64 * stride_don + dd[None, :], mask=mask, other=0.0)
    idx = pid_bh.to(tl.int64) * Nq + rows
    lse2 = _load_lse2(lse_ptr + pid_bh.to(tl.int64) * Nq, rows, row_ok)
    delta = tl.load(delta_ptr + idx, mask=row_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    kpm_base = kpm_ptr + b * stride_kpmb

    off = Nkv - Nq
    if CAUSAL:
        hi = tl.maximum(tl.minimum(Nkv, m0 + BLOCK_M + off), 0)
        full = tl.maximum(tl.minimum(Nkv, m0 + off + 1), 0)
        full = (full // BLOCK_N) * BLOCK_N
    else:
        hi = Nkv
        full = (Nkv // BLOCK_N) * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, kpm_base, stride_kn, stride_vn, rows, dd, d_ok, 0, full,
                   Nkv, off, qk_scale, False, CAUSAL, HAS_KPM, DOT_PRECISION, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, kpm_base, stride_kn, stride_vn, rows, dd, d_ok, full, hi,
                   Nkv, off, qk_scale, True, CAUSAL, HAS_KPM, DOT_PRECISION, BLOCK_N)
    # dq is written contiguous [B, Hq, Nq, D]
    tl.store(dq_ptr + pid_bh.to(tl.int64) * Nq * D + r64 * D + dd[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=mask)


# ----------------------------------------------------------------------------- tile sizes

# Shared memory per block (opt-in maximum) by compute capability, for when the driver does not say.
SMEM_BYTES = {(9, 0): 232448, (8, 0): 166912, (8, 6): 101376, (8, 9): 101376, (8, 7): 166912, (7, 5): 65536}
# Before sm_80 Triton lays the backward's tiles out with more than `_smem` counts (a T4's dK/dV at head dim 64:
# 72 KB compiled against 48 KB estimated, past its 64 KB): there the tiles are fitted into this fraction of it.
PRE_SM80_SMEM_FRACTION = 0.6
MAX_HEAD_DIM = 256


class Tiles(NamedTuple):
    """Launch shape of one kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


class AttnConfig(NamedTuple):
    """Tiles of the forward, the dK/dV and the dQ kernels, and the padded head dim BLOCK_D."""

    block_d: int
    fwd: Tiles
    dkdv: Tiles
    dq: Tiles


def block_d(head_dim: int) -> int:
    """The power-of-two tile width (>= 16, tl.dot's minimum) that holds the head dim."""
    return max(16, 1 << max(0, (head_dim - 1).bit_length()))


# Under TRITON_INTERPRET=1 (tests on CPU): small, unequal tiles so that short sequences already span
# several tiles, edge tiles and causal diagonals in both loop orders.
INTERPRETER = (Tiles(32, 16, 4, 1), Tiles(16, 32, 4, 1), Tiles(32, 16, 4, 1))

# By padded head dim, for 2-byte inputs on sm_90 (H100/H200, 227 KB of shared memory per block). The
# backward tiles of head dims 64 and 128 are measured: forward + backward, bf16, not causal, on an H200
# (Triton 3.6, 2026-11-27, benchmarks/tune_attention_tiles.py; results/2026-11-27_H200_attention_tiles.txt),
# against the spill-free tiles chosen before from the compiled cubins alone, which measured slower:
#   D = 64  (4 x 32 x 4096): 6.77 -> 5.82 ms   D = 40 (8 x 8 x 4096, SD1.5): 6.29 -> 5.46 ms
#   D = 128 (4 x 16 x 4096): 13.6 -> 5.21 ms   D = 80 (8 x 8 x 1024):        1.70 -> 1.28 ms
# (SDPA's cuDNN backend: 4.15, 3.22, 2.20 ms). These tiles spill registers (24-376 bytes per thread in the
# Triton 3.8 sm_90 builds) and run faster than the spill-free ones all the same: 4 warps with 3 stages beat 8
# warps. The forward tiles and head dim 256 are not measured yet.
SM90 = {
    64: (Tiles(128, 64, 4, 3), Tiles(64, 64, 4, 3), Tiles(128, 64, 4, 3)),
    128: (Tiles(128, 64, 8, 3), Tiles(32, 64, 4, 3), Tiles(128, 64, 8, 3)),
    256: (Tiles(64, 32, 8, 2), Tiles(16, 32, 8, 2), Tiles(32, 32, 8, 2)),
}
# sm_86 / sm_89 (about 100 KB of shared memory, fewer registers per SM in flight): smaller tiles, not
# measured (no such card at hand): chosen to spill no register with Triton 3.6 and 3.8 (checked ahead of time;
# the D = 64 dK/dV tile 32 x 64 spilled 40 bytes per thread with Triton 3.6), a heuristic that the sm_90
# measurements above show to be no guarantee of speed.
SM8X = {
    64: (Tiles(64, 64, 8, 2), Tiles(16, 128, 8, 2), Tiles(64, 32, 4, 2)),
    128: (Tiles(64, 64, 8, 2), Tiles(32, 64, 8, 2), Tiles(64, 32, 4, 2)),
    256: (Tiles(64, 32, 8, 1), Tiles(32, 32, 8, 1), Tiles(64, 16, 8, 1)),
}


def _smem(kind: str, t: Tiles, bd: int, itemsize: int) -> int:
    """Shared memory that a kernel's tiles need (bytes), estimated as Triton lays them out: the loop's
    streamed operands once per pipeline stage, the resident ones once, plus one [M, N] tile for p / ds."""
    m, n, stages = t.block_m, t.block_n, max(1, t.num_stages)
    if kind == "fwd":  # q resident; k, v streamed
        return itemsize * (m * bd + stages * 2 * n * bd + m * n)
    if kind == "dkdv":  # k, v resident; q, dO streamed
        return itemsize * (2 * n * bd + stages * 2 * m * bd + 2 * m * n)
    return itemsize * (2 * m * bd + stages * 2 * n * bd + m * n)  # dq: q, dO resident; k, v streamed


def _fit(kind: str, t: Tiles, bd: int, itemsize: int, smem: int) -> Tiles:
    """Shrink t until it fits `smem`: fewer stages (down to 2), then halve the larger block (down to 16),
    then a single stage."""
    while _smem(kind, t, bd, itemsize) > smem:
        m, n, w, s = t
        if s > 2:
            t = Tiles(m, n, w, s - 1)
        elif max(m, n) > 16:
            t = Tiles(m // 2, n, w, s) if m >= n else Tiles(m, n // 2, w, s)
        elif s > 1:
            t = Tiles(m, n, w, 1)
        else:
            break
    return t


def tile_config(head_dim: int, itemsize: int, capability: tuple[int, int] | None,
                smem_bytes: int | None = None) -> AttnConfig:
    """Tiles for one call: a pure function of the head dim, the element size and the device (compute
    capability and shared memory per block), both passed in by the launcher at call time.

    capability None means the CPU interpreter. fp32 inputs (4-byte) start from the same tiles and
    shrink to fit the shared memory.
    """
    bd = block_d(head_dim)
    if capability is None:
        return AttnConfig(bd, *INTERPRETER)
    table = SM90 if capability >= (8, 0) and capability not in ((8, 6), (8, 9)) else SM8X
    if smem_bytes is None:
        smem_bytes = SMEM_BYTES.get(tuple(capability), 101376)
    start = table[max(64, bd)]
    if capability < (8, 0):
        smem_bytes = int(smem_bytes * PRE_SM80_SMEM_FRACTION)
    kinds = ("fwd", "dkdv", "dq")
    fitted = tuple(_fit(kind, t, bd, itemsize, smem_bytes) for kind, t in zip(kinds, start))
    return AttnConfig(bd, *fitted)
