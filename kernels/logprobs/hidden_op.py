"""Custom ops `fusedrl::hidden_logprobs_fwd` / `_bwd` over the Triton kernels, paired for autograd by
`HiddenLogprobs`. Layout: hidden [N, H] (rows may be strided, H contiguous), weight [V, H]
contiguous, bias [V] or None, labels [N] int.

The backward goes one vocabulary chunk of C columns at a time: the Triton kernel writes the chunk's
dz [N, C] (input dtype), then dW[chunk] = dz^T h and dh += dz W[chunk] are plain matmuls. C is
chosen so that dz holds at most max(4M, N V / 64) elements (in bf16, under 1% of the [N, V] fp32
logits). Besides the outputs, the backward holds dz and, when there are several chunks and the
input is fp16/bf16, an fp32 dh accumulator [N, H] (so that dh is rounded once, as a single matmul
would round it).
"""

from __future__ import annotations

import functools

import torch
import triton

from ..tiles import device_limits
from . import hidden_triton as hk

DZ_MIN_ELEMENTS = 1 << 22
COMBINE_ROWS = 256  # rows per program of the forward's split combine


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input_precision for these inputs: TF32 for fp32 only when torch allows it for matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def chunk_columns(N: int, V: int) -> int:
    """Vocabulary columns per backward chunk: a multiple of BLOCK_V, at most V rounded up."""
    budget = max(DZ_MIN_ELEMENTS, N * V // 64)
    cols = max(1, budget // max(N, 1))
    cols = triton.cdiv(cols, hk.COLUMN_ALIGN) * hk.COLUMN_ALIGN
    return min(cols, triton.cdiv(V, hk.COLUMN_ALIGN) * hk.COLUMN_ALIGN)


def vocab_splits(N: int, V: int, tiles: hk.Tiles, limits) -> int:
    """Vocabulary splits of the forward: the fewest that keep the multiprocessors >= 90% busy over the
    launch's waves of (row block, split) programs (these tiles hold one program per multiprocessor), else
    the busiest; at most one split per BLOCK_V tile. E.g. N = 8192 on 132 SMs: 64 row blocks alone fill
    48%, 2 splits 97%. 1 when the row blocks already fill the device, and under the interpreter."""
    return _splits(triton.cdiv(N, tiles.block_n), triton.cdiv(V, tiles.block_v), limits.multiprocessors)


@functools.lru_cache(maxsize=256)
def _splits(row_blocks: int, v_tiles: int, sms: int) -> int:
    best, best_busy = 1, 0.0
    for splits in range(1, min(v_tiles, 4 * sms) + 1):
        programs = row_blocks * splits
        busy = programs / (triton.cdiv(programs, sms) * sms)
        if busy >= 0.9:
            return splits
        if busy > best_busy:
            best, best_busy = splits, busy
    return best


def tiles_for(t: torch.Tensor) -> hk.Tiles:
    return hk.pick_tiles(t.element_size(), device_limits(t.device))


def _check_backend(backend: str) -> None:
    if backend != "triton":
        raise RuntimeError(f"token_logprobs has no {backend!r} kernels (only triton); dispatch should not pick it")


@torch.library.custom_op("fusedrl::hidden_logprobs_fwd", mutates_args=())
def hidden_logprobs_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    temperature: float, softcap: float, ignore_index: int, want_entropy: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (logp [N], entropy [N] or empty, lse [N]), fp32. softcap <= 0 means none."""
    _check_backend(backend)
    N, H = hidden.shape
    V = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    logp, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    entropy = torch.empty(N if want_entropy else 0, **f32)
    if N:
        tiles = tiles_for(hidden)
        splits = vocab_splits(N, V, tiles, device_limits(hidden.device))
        split_cols = triton.cdiv(triton.cdiv(V, splits), tiles.block_v) * tiles.block_v
        splits = triton.cdiv(V, split_cols)
        part = torch.empty((4, splits, N) if splits > 1 else 0, **f32)
        hk._hidden_fwd_kernel[(triton.cdiv(N, tiles.block_n), splits)](
            hidden, weight, bias if bias is not None else weight, labels, logp, entropy if want_entropy else logp, lse,
            part, N, V, H, hidden.stride(0), weight.stride(0), 1.0 / temperature, softcap, ignore_index, split_cols,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, WANT_ENTROPY=want_entropy, SPLIT=splits > 1,
            BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_H=tiles.block_h,
            DOT_PRECISION=dot_precision(hidden.dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )
        if splits > 1:
            hk._hidden_fwd_combine_kernel[(triton.cdiv(N, COMBINE_ROWS),)](
                part, labels, logp, entropy if want_entropy else logp, lse, N, V, splits, ignore_index,
                WANT_ENTROPY=want_entropy, BLOCK=COMBINE_ROWS,
            )
    return logp, entropy, lse


@hidden_logprobs_fwd.register_fake
def _(hidden, weight, bias, labels, temperature, softcap, ignore_index, want_entropy, backend):
    N = hidden.shape[0]
    f32 = dict(dtype=torch.float32)
    return hidden.new_empty(N, **f32), hidden.new_empty(N if want_entropy else 0, **f32), hidden.new_empty(N, **f32)


@torch.library.custom_op("fusedrl::hidden_logprobs_bwd", mutates_args=())
def hidden_logprobs_bwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    lse: torch.Tensor, entropy: torch.Tensor, g_logp: torch.Tensor | None, g_entropy: torch.Tensor | None,
    temperature: float, softcap: float, ignore_index: int, need_dh: bool, need_dw: bool, need_db: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dhidden [N, H] like hidden or empty, dweight [V, H] like weight or empty, dbias [V] or empty)."""
    _check_backend(backend)
    N, H = hidden.shape
    V = weight.shape[0]
    C = chunk_columns(N, V)
    several = C < V
    # dh: fp32 accumulator across chunks for fp16/bf16 (one rounding at the end); fp32 accumulates in place.
    dh = None
    if need_dh:
        dh = torch.zeros((N, H), device=hidden.device, dtype=torch.float32 if several else hidden.dtype)
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty(V, device=hidden.device, dtype=torch.float32) if need_db else None
    if N and (need_dh or need_dw or need_db):
        dz = torch.empty((N, C), device=hidden.device, dtype=hidden.dtype)
        tiles = tiles_for(hidden)
        for v0 in range(0, V, C):
            width = min(C, V - v0)
            block = dz[:, :width]
            hk._hidden_dz_kernel[(triton.cdiv(N, tiles.block_n), triton.cdiv(width, tiles.block_v))](
                hidden, weight, bias if bias is not None else weight, labels, lse,
                entropy if g_entropy is not None else lse, g_logp if g_logp is not None else lse,
                g_entropy if g_entropy is not None else lse, dz,
                N, V, H, v0, width, hidden.stride(0), weight.stride(0), dz.stride(0), 1.0 / temperature, softcap,
                ignore_index,
                HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, HAS_G_LOGP=g_logp is not None,
                HAS_G_ENTROPY=g_entropy is not None, BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v,
                BLOCK_H=tiles.block_h, DOT_PRECISION=dot_precision(hidden.dtype), num_warps=tiles.num_warps,
                num_stages=tiles.num_stages,
            )
            w_chunk = weight[v0:v0 + width]
            if need_dw:
                torch.mm(block.T, hidden, out=dw[v0:v0 + width])
            if need_db:
                db[v0:v0 + width] = block.sum(0, dtype=torch.float32)
            if need_dh:
                if dh.dtype == block.dtype:
                    dh.addmm_(block, w_chunk)
                else:
                    dh += block @ w_chunk
    elif need_dw:
        dw.zero_()
    if need_db and not N:
        db.zero_()
    # Outputs must not alias each other: a fresh empty tensor for each one not computed.
    return (dh.to(hidden.dtype) if need_dh else weight.new_empty(0), dw if need_dw else weight.new_empty(0),
            db.to(bias.dtype) if need_db else weight.new_empty(0))


@hidden_logprobs_bwd.register_fake
def _(hidden, weight, bias, labels, lse, entropy, g_logp, g_entropy, temperature, softcap, ignore_index, need_dh,
      need_dw, need_db, backend):
    return (torch.empty_like(hidden) if need_dh else weight.new_empty(0),
            torch.empty_like(weight) if need_dw else weight.new_empty(0),
            torch.empty_like(bias) if need_db else weight.new_empty(0))


class HiddenLogprobs(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias, labels [N]) -> (logp [N], entropy [N] or empty)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, softcap, ignore_index, want_entropy, backend):
        logp, entropy, lse = hidden_logprobs_fwd(hidden, weight, bias, labels, temperature, softcap, ignore_index,
                                                 want_entropy, backend)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.args = (temperature, softcap, ignore_index)
        ctx.want_entropy = want_entropy
        ctx.backend = backend
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        temperature, softcap, ignore_index = ctx.args
        need_dh, need_dw = ctx.needs_input_grad[:2]
        need_db = bias is not None and ctx.needs_input_grad[2]
        g_entropy = g_entropy.contiguous() if ctx.want_entropy and g_entropy is not None else None
        g_logp = None if g_logp is None else g_logp.contiguous()
        dh, dw, db = hidden_logprobs_bwd(hidden, weight, bias, labels, lse, entropy, g_logp, g_entropy, temperature,
                                         softcap, ignore_index, need_dh, need_dw, need_db, ctx.backend)
        return (dh if need_dh else None, dw if need_dw else None, db if need_db else None,
                None, None, None, None, None, None)
