"""Triton kernels of the "chunked" strategy of `token_logprobs`: the device's matmul library (cuBLAS
through `torch.mm`) writes the logits of one vocabulary chunk, z = h W[chunk]^T [N, C] in fp32, and
these kernels reduce that chunk. Same math as the "fused" kernels of `hidden_triton.py` (the same
`_cap` / `_fold` / `_dz` helpers), but the matmul runs at the library's rate instead of inside the
Triton tiles; the price is writing and reading the fp32 chunk once per pass (8 bytes per logit against
2 H flops of matmul: ~20% on top of the matmul's time at H = 4096 on an H200, 4.2 TB/s and ~790
TFLOP/s).

Forward: `_chunk_fold_kernel`, one program per BLOCK_N rows, folds the chunk into the rows' online
state ([4, N] fp32: max, sum, entropy sum, label logit) and, at the last chunk, writes logp, entropy
and lse. Backward: `_chunk_dz_kernel` turns the chunk's logits into dz [N, C] (input dtype), which
the launcher multiplies into dh and dW as the fused strategy does.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from ..tiles import INTERPRETER
from .hidden_triton import _cap, _dz, _empty_state, _finish_rows, _fold, _row_grad_inputs, _store_state
from .triton_kernels import NEG_BIG


@dataclass(frozen=True)
class RowTiles:
    block_n: int  # rows per program
    block_v: int  # chunk columns per tile
    num_warps: int


# Memory-bound: 2048-element fp32 tiles (8 KB) per step, 4 warps; the interpreter prefers few big programs.
GPU_ROW_TILES = RowTiles(16, 128, 4)
INTERPRETER_ROW_TILES = RowTiles(64, 256, 4)


def row_tiles(limits) -> RowTiles:
    return INTERPRETER_ROW_TILES if limits == INTERPRETER else GPU_ROW_TILES


@triton.jit
def _chunk_fold_kernel(
    z_ptr, b_ptr, labels_ptr, state_ptr, logp_ptr, entropy_ptr, lse_ptr,
    N, V, v0, C, stride_z, inv_temp, softcap, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_ENTROPY: tl.constexpr, FIRST: tl.constexpr,
    LAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Rows [i BLOCK_N, (i + 1) BLOCK_N) of the chunk z [N, C] (vocabulary columns [v0, v0 + C)) folded into
    state [4, N] (read unless FIRST; written unless LAST, which writes logp / entropy / lse instead)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    if FIRST:
        m, s, u, x_label = _empty_state(BLOCK_N)
    else:
        m = tl.load(state_ptr + rows, mask=row_ok, other=NEG_BIG)
        s = tl.load(state_ptr + N + rows, mask=row_ok, other=0.0)
        u = tl.load(state_ptr + 2 * N + rows, mask=row_ok, other=0.0)
        x_label = tl.load(state_ptr + 3 * N + rows, mask=row_ok, other=0.0)
    for c0 in range(0, C, BLOCK_V):
        local = c0 + tl.arange(0, BLOCK_V)
        cols = v0 + local
        col_ok = local < C
        acc = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_z + local[None, :],
                      mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        z, _ = _cap(acc, b_ptr, cols, col_ok, softcap, HAS_BIAS, HAS_SOFTCAP)
        m, s, u, x_label = _fold(m, s, u, x_label, z, cols, col_ok, labels, inv_temp, WANT_ENTROPY)
    if LAST:
        _finish_rows(m, s, u, x_label, labels, rows, row_ok, V, ignore_index, logp_ptr, entropy_ptr, lse_ptr,
                     WANT_ENTROPY)
    else:
        _store_state(state_ptr + rows, N, m, s, u, x_label, row_ok)


@triton.jit
def _chunk_dz_kernel(
    z_ptr, b_ptr, labels_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_entropy_ptr, dz_ptr,
    N, v0, C, stride_z, stride_dz, inv_temp, softcap, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_G_LOGP: tl.constexpr, HAS_G_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """dz [N, C] (dtype of dz_ptr) from the chunk's logits z [N, C] (vocabulary columns [v0, v0 + C))."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    local = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v0 + local
    row_ok = rows < N
    col_ok = local < C
    labels, valid, lse, g_logp, g_ent, entropy = _row_grad_inputs(
        rows, row_ok, labels_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_entropy_ptr, ignore_index, HAS_G_LOGP,
        HAS_G_ENTROPY)
    mask = row_ok[:, None] & col_ok[None, :]
    acc = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_z + local[None, :], mask=mask, other=0.0)
    z, t = _cap(acc, b_ptr, cols, col_ok, softcap, HAS_BIAS, HAS_SOFTCAP)
    dz = _dz(z, t, cols, col_ok, labels, valid, lse, g_logp, g_ent, entropy, inv_temp, HAS_G_ENTROPY, HAS_SOFTCAP)
    tl.store(dz_ptr + rows[:, None].to(tl.int64) * stride_dz + local[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=mask)
