"""Triton kernels: token log-probabilities and entropy straight from hidden states and the LM head.

Forward, one program per (BLOCK_N rows, vocabulary split): for each BLOCK_V tile of its split it
computes the logits tile z = cap(h W^T + b) / T with `tl.dot` over BLOCK_H slices of the hidden size
(fp32 accumulation) and folds it into an online log-sum-exp and entropy (the update of
`triton_kernels.py`, per row of the block), picking up the label's logit on the way. Nothing
[N, V] is ever written; lse and H ([N] fp32) are kept for the backward. With one split the program
writes the results; with S > 1 splits (when N / BLOCK_N row blocks alone would leave multiprocessors
idle: 64 programs for N = 8192 on an H200's 132) each writes its partial (max, sum, entropy sum,
label logit) to a [4, S, N] fp32 buffer and `_hidden_fwd_combine_kernel` merges the S partials.

Backward, one vocabulary chunk [v0, v0 + C) of a block of R rows at a time (`hidden_op.py` loops;
R = N unless the head is frozen): `_hidden_dz_kernel` recomputes the chunk's logits tile by tile and
writes only dz = (g_logp (onehot - p) - g_H p (log p + H)) / T (times cap' under soft-capping) as an
[R, C] block in the input dtype; the launcher then makes the gradient matmuls with cuBLAS:
dW[chunk] = dz^T h (reduction over all N rows, written once, no accumulator) and dh += dz W[chunk].
Scattering dz W and dz^T h into dh and dW with atomics from every (row block, vocabulary tile)
program, the first design, needs N H V / BLOCK_V + V H N / BLOCK_N
fp32 atomic adds (~10^11 at N = 8192, H = 4096, V = 131072): far slower than the matmuls.

fp32 inputs: `tl.dot` runs in IEEE fp32 unless torch allows TF32 for matmuls
(`torch.backends.cuda.matmul.allow_tf32`), the setting torch's own fp32 matmuls follow; the
DOT_PRECISION constexpr carries the choice. tanh is written with exp (no libdevice, so the CPU
interpreter runs it).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from ..tiles import INTERPRETER
from .triton_kernels import NEG_BIG


@dataclass(frozen=True)
class Tiles:
    block_n: int  # rows of hidden per program
    block_v: int  # vocabulary columns per tile
    block_h: int  # hidden-size slice per tl.dot step
    num_warps: int
    num_stages: int

    def shared_bytes(self, itemsize: int) -> int:
        """Estimated shared memory: pipelined h and W slices, plus the fp32 logits tile that the
        row reductions (max, sum) exchange through shared memory."""
        operands = (self.block_n + self.block_v) * self.block_h * itemsize * self.num_stages
        return operands + self.block_n * self.block_v * 4


# Largest first; the first that fits the device's shared memory is used. 128 x 128 x 64 with 8 warps and
# 3 stages is the usual Hopper/Ampere bf16 matmul tile; the smaller ones serve sm_86/sm_89 (99 KB per block).
GPU_TILES = (
    Tiles(128, 128, 64, 8, 3),
    Tiles(128, 128, 32, 8, 3),
    Tiles(64, 128, 32, 4, 3),
    Tiles(64, 64, 32, 4, 2),
)
# Under TRITON_INTERPRET=1 (CPU tests) every program is Python: few, mid-sized tiles run fastest.
INTERPRETER_TILES = Tiles(64, 128, 64, 4, 1)
# A multiple of every block_v above: the backward's vocabulary chunks are cut on it.
COLUMN_ALIGN = 128


def pick_tiles(itemsize: int, limits) -> Tiles:
    """Tiles for inputs of `itemsize` bytes on a device with `limits` (fusedrl.kernels.tiles.DeviceLimits)."""
    if limits == INTERPRETER:
        return INTERPRETER_TILES
    for tiles in GPU_TILES:
        if tiles.shared_bytes(itemsize) <= limits.shared_memory:
            return tiles
    return GPU_TILES[-1]


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _cap(acc, b_ptr, cols, col_ok, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """(cap(acc + b) fp32, tanh of the capped argument or 0) for a [rows, columns] tile of h W^T."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    t = tl.zeros(acc.shape, tl.float32)
    if HAS_SOFTCAP:
        t = _tanh(acc / softcap)
        acc = softcap * t
    return acc, t


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, softcap,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(cap(h W^T + b) [BLOCK_N, BLOCK_V] fp32, tanh of the capped argument or 0)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return _cap(acc, b_ptr, cols, col_ok, softcap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def _fold(m, s, u, x_label, z, cols, col_ok, labels, inv_temp, WANT_ENTROPY: tl.constexpr):
    """Fold a [rows, columns] tile of capped logits z into the rows' online state: running max m,
    s = sum exp(x - m), u = sum exp(x - m) (x - m) and the label's x, where x = z / T; columns outside
    col_ok do not count."""
    z = tl.where(col_ok[None, :], z * inv_temp, float("-inf"))
    x_label += tl.sum(tl.where((cols[None, :] == labels[:, None]) & col_ok[None, :], z, 0.0), axis=1)
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp(m - m_new)
    e = tl.exp(z - m_new[:, None])
    if WANT_ENTROPY:
        u = alpha * (u + (m - m_new) * s) + tl.sum(e * tl.where(e > 0.0, z - m_new[:, None], 0.0), axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    return m_new, s, u, x_label


@triton.jit
def _empty_state(BLOCK_N: tl.constexpr):
    """The online state (m, s, u, x_label) of BLOCK_N rows before any column."""
    zeros = tl.zeros([BLOCK_N], tl.float32)
    return tl.full([BLOCK_N], NEG_BIG, tl.float32), zeros, zeros, zeros


@triton.jit
def _store_state(ptr, plane, m, s, u, x_label, mask):
    """Write the state into four planes `plane` elements apart (ptr: the rows' places in the first)."""
    tl.store(ptr, m, mask=mask)
    tl.store(ptr + plane, s, mask=mask)
    tl.store(ptr + 2 * plane, u, mask=mask)
    tl.store(ptr + 3 * plane, x_label, mask=mask)


@triton.jit
def _row_grad_inputs(rows, row_ok, labels_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_entropy_ptr, ignore_index,
                     HAS_G_LOGP: tl.constexpr, HAS_G_ENTROPY: tl.constexpr):
    """(labels, valid, lse, g_logp, g_entropy, entropy) of the rows; the incoming gradients are 0 at ignored rows."""
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = row_ok & (labels != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g_logp = tl.zeros(rows.shape, tl.float32)
    g_ent = tl.zeros(rows.shape, tl.float32)
    entropy = tl.zeros(rows.shape, tl.float32)
    if HAS_G_LOGP:
        g_logp = tl.where(valid, tl.load(g_logp_ptr + rows, mask=row_ok, other=0.0), 0.0)
    if HAS_G_ENTROPY:
        g_ent = tl.where(valid, tl.load(g_entropy_ptr + rows, mask=row_ok, other=0.0), 0.0)
        entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
    return labels, valid, lse, g_logp, g_ent, entropy


@triton.jit
def _dz(z, t, cols, col_ok, labels, valid, lse, g_logp, g_ent, entropy, inv_temp,
        HAS_G_ENTROPY: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """d(loss)/d(raw logits) for a [rows, columns] tile of capped logits z (t: the tanh of soft-capping);
    0 at ignored rows and outside col_ok."""
    log_p = z * inv_temp - lse[:, None]
    p = tl.where(col_ok[None, :], tl.exp(log_p), 0.0)
    dz = tl.where(cols[None, :] == labels[:, None], g_logp[:, None], 0.0) - g_logp[:, None] * p
    if HAS_G_ENTROPY:
        dz -= g_ent[:, None] * p * tl.where(p > 0.0, log_p + entropy[:, None], 0.0)
    dz = dz * inv_temp
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)
    return tl.where(valid[:, None] & col_ok[None, :], dz, 0.0)


@triton.jit
def _finish_rows(m, s, u, x_label, labels, rows, row_ok, V, ignore_index, logp_ptr, entropy_ptr, lse_ptr,
                 WANT_ENTROPY: tl.constexpr):
    """Store logp, entropy and lse of rows whose online state over the whole vocabulary is (m, s, u, x_label)."""
    log_s = tl.log(s)
    lse = m + log_s
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < V)
    logp = tl.where(in_range, tl.minimum(x_label - lse, 0.0, propagate_nan=tl.PropagateNan.ALL), float("nan"))
    tl.store(logp_ptr + rows, tl.where(valid, logp, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if WANT_ENTROPY:
        tl.store(entropy_ptr + rows, tl.where(valid, log_s - u / s, 0.0), mask=row_ok)


@triton.jit
def _hidden_fwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, logp_ptr, entropy_ptr, lse_ptr, part_ptr,
    N, V, H, stride_h, stride_w, inv_temp, softcap, ignore_index, split_cols,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_ENTROPY: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (i, j): rows [i BLOCK_N, (i + 1) BLOCK_N), vocabulary [j split_cols, (j + 1) split_cols)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    v_begin = tl.program_id(1) * split_cols
    v_end = tl.minimum(v_begin + split_cols, V)
    m, s, u, x_label = _empty_state(BLOCK_N)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z, _ = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, softcap,
                            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
        m, s, u, x_label = _fold(m, s, u, x_label, z, cols, col_ok, labels, inv_temp, WANT_ENTROPY)
    if SPLIT:
        # partials [4, S, N]: max, sum of exp(z - max), entropy sum, label logit (0 outside this split)
        _store_state(part_ptr + tl.program_id(1) * N + rows, tl.num_programs(1) * N, m, s, u, x_label, row_ok)
    else:
        _finish_rows(m, s, u, x_label, labels, rows, row_ok, V, ignore_index, logp_ptr, entropy_ptr, lse_ptr,
                     WANT_ENTROPY)


@triton.jit
def _hidden_fwd_combine_kernel(
    part_ptr, labels_ptr, logp_ptr, entropy_ptr, lse_ptr, N, V, S, ignore_index,
    WANT_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    """Merge the S vocabulary splits' partials of BLOCK rows: rebase each to the rows' overall max."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    plane = S * N
    # rows past N read max 0 and sum 1 (finite results, not stored)
    m = tl.full([BLOCK], NEG_BIG, tl.float32)
    for j in range(0, S):
        m = tl.maximum(m, tl.load(part_ptr + j * N + rows, mask=row_ok, other=0.0))
    s = tl.zeros([BLOCK], tl.float32)
    u = tl.zeros([BLOCK], tl.float32)
    x_label = tl.zeros([BLOCK], tl.float32)
    for j in range(0, S):
        part = part_ptr + j * N + rows
        m_j = tl.load(part, mask=row_ok, other=0.0)
        s_j = tl.load(part + plane, mask=row_ok, other=1.0)
        alpha = tl.exp(m_j - m)
        s += alpha * s_j
        if WANT_ENTROPY:
            u += alpha * (tl.load(part + 2 * plane, mask=row_ok, other=0.0) + (m_j - m) * s_j)
        x_label += tl.load(part + 3 * plane, mask=row_ok, other=0.0)
    _finish_rows(m, s, u, x_label, labels, rows, row_ok, V, ignore_index, logp_ptr, entropy_ptr, lse_ptr,
                 WANT_ENTROPY)


@triton.jit
def _hidden_dz_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_entropy_ptr, dz_ptr,
    N, V, H, v0, C, stride_h, stride_w, stride_dz, inv_temp, softcap, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_G_LOGP: tl.constexpr, HAS_G_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dz [N, C] (dtype of dz_ptr) = d(loss)/d(raw logits) for vocabulary columns [v0, v0 + C);
    zero at ignored rows and past V."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    local = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v0 + local
    row_ok = rows < N
    col_ok = (local < C) & (cols < V)
    labels, valid, lse, g_logp, g_ent, entropy = _row_grad_inputs(
        rows, row_ok, labels_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_entropy_ptr, ignore_index, HAS_G_LOGP,
        HAS_G_ENTROPY)
    z, t = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, softcap,
                        HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION)
    dz = _dz(z, t, cols, col_ok, labels, valid, lse, g_logp, g_ent, entropy, inv_temp, HAS_G_ENTROPY, HAS_SOFTCAP)
    tl.store(dz_ptr + rows[:, None].to(tl.int64) * stride_dz + local[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (local < C)[None, :])
