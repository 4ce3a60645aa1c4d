"""Custom ops `fusedrl::hidden_logprobs_fwd` / `_bwd` over the Triton kernels, paired for autograd by
`HiddenLogprobs`. Layout: hidden [N, H] (rows may be strided, H contiguous), weight [V, H]
contiguous, bias [V] or None, labels [N] int.

Two strategies compute the logits (`strategy`; `FUSEDRL_TOKEN_LOGPROBS=fused|chunked` picks one):
- "fused": the Triton kernels compute logits tiles with `tl.dot` and reduce them in registers
  (`hidden_triton.py`); nothing [N, V] or [N, C] holds logits.
- "chunked": `torch.mm` (cuBLAS on a GPU) writes one vocabulary chunk's logits [N, C] in fp32 and
  the Triton kernels of `hidden_chunked_triton.py` reduce it: the matmul at the library's rate, for
  one extra write and read of the chunk.
Unset ("auto"): "chunked" on CUDA where torch's matmuls take an fp32 output (torch >= 2.8), else "fused".
Measured on an H200 (2026-11-27, N = 8192, H = 4096, V = 131072, bf16): chunked / fused forward 13.9 / 20.4
ms, forward + backward 60.9 / 66.2 ms (head trained), 44.4 / 52.6 ms (frozen).

The backward goes one vocabulary chunk of C columns at a time: the chunk's dz (input dtype) is
written by a Triton kernel (from recomputed logits tiles, or from the chunk's logits), then
dW[chunk] (+)= dz^T h and dh += dz W[chunk] are plain matmuls (a Python loop over the chunks: one
Triton launch and one to three matmuls each). fp16/bf16 dh is summed over the chunks in fp32, each
chunk's product unrounded (`add_matmul`), and rounded once at the end. The buffers stay within
max(8 MiB, N V / 32 bytes), under 1% of the [N, V] fp32 logits (`backward_blocks`): the rows go in
blocks of R, so that a block's fp32 dh sum [R, H] fits that budget too. A trained head's dW[chunk]
then sums its row blocks' products in the weight's dtype: one rounding per block for fp16/bf16 (N / R
= 256 H / V of them, 8 at H = 4096, V = 131072), as Liger-Kernel's row chunks do; exact sums in fp32.
At most MAX_DW_BLOCKS blocks: with a small vocabulary (V < 32 H) the dh sum then exceeds the budget
(e.g. 17 MB against 4 MB at N = 8192, H = 4096, V = 32000) rather than dW taking more roundings.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from ..device_guard import on_inputs_device
from ..tiles import device_limits
from . import hidden_chunked_triton as ck
from . import hidden_triton as hk

STRATEGIES = ("fused", "chunked")
AUTO = "auto"
CHOICES = STRATEGIES + (AUTO,)  # what a caller or FUSEDRL_TOKEN_LOGPROBS may ask for
ENV_STRATEGY = "FUSEDRL_TOKEN_LOGPROBS"
CHUNK_MIN_BYTES = 8 << 20
ROW_ALIGN = 128  # row blocks of the backward: whole dz-kernel row tiles
MAX_DW_BLOCKS = 8  # a trained 16-bit head's dW is rounded once per row block: at most this many
COMBINE_ROWS = 256  # rows per program of the forward's split combine


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input_precision for these inputs: TF32 for fp32 only when torch allows it for matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def strategy() -> str:
    """The strategy `FUSEDRL_TOKEN_LOGPROBS` asks for (read at each call), else "auto" (`resolve`, in the op)."""
    value = os.environ.get(ENV_STRATEGY, "").strip().lower() or AUTO
    if value not in CHOICES:
        raise ValueError(f"{ENV_STRATEGY}={value!r} is not a token_logprobs strategy; choose one of {STRATEGIES} "
                         "or leave it unset")
    return value


def resolve(strategy: str, hidden: torch.Tensor) -> str:
    """"auto" -> "chunked" for CUDA tensors where torch's mm takes fp32 outputs of 16-bit inputs, else "fused";
    the others as they are. Decided inside the custom ops (eager code: the probe runs CUDA matmuls)."""
    if strategy != AUTO:
        return strategy
    if hidden.is_cuda and (hidden.dtype == torch.float32 or fp32_out_matmuls("cuda")):
        return "chunked"
    return "fused"


def chunk_budget(N: int, V: int) -> int:
    """Bytes the chunk buffers (and a row block's fp32 dh accumulator) may hold: max(8 MiB, N V / 32), i.e.
    under 1% of the [N, V] fp32 logits once those are over 800 MiB."""
    return max(CHUNK_MIN_BYTES, N * V // 32)


def chunk_columns(N: int, V: int, bytes_per_entry: int, budget: int | None = None) -> int:
    """Vocabulary columns per chunk when each of the chunk's [N, C] entries holds `bytes_per_entry` bytes of
    buffers within `budget` bytes (default `chunk_budget`): a multiple of COLUMN_ALIGN (the fused kernels'
    BLOCK_V divides it; the kernels mask partial tiles), rounded down but at least COLUMN_ALIGN, and at most V
    rounded up."""
    budget = chunk_budget(N, V) if budget is None else budget
    cols = budget // (max(N, 1) * bytes_per_entry) // hk.COLUMN_ALIGN * hk.COLUMN_ALIGN
    return min(max(cols, hk.COLUMN_ALIGN), triton.cdiv(V, hk.COLUMN_ALIGN) * hk.COLUMN_ALIGN)


def backward_blocks(N: int, H: int, V: int, itemsize: int, chunked: bool, need_dw: bool,
                    need_dh: bool = True) -> tuple[int, int]:
    """(R rows per block, C vocabulary columns per chunk) of the backward's loops.

    When fp16/bf16 dh is summed over several chunks, the rows go in blocks (at least ROW_ALIGN rows) whose
    fp32 dh accumulator [R, H] takes half the budget and the chunk buffers the other half, so that the
    backward's extra memory stays within `chunk_budget`; a trained head's dW[chunk] then adds one product per
    row block, in at most MAX_DW_BLOCKS blocks (module docstring). Otherwise (no dh, fp32 dh summed in the
    output itself, or one chunk) every row goes at once (R = N), and dW[chunk] = dz^T h is one matmul."""
    per_entry = itemsize + (4 if chunked else 0)  # dz (+ the fp32 logits chunk)
    C = chunk_columns(N, V, per_entry)
    if not need_dh or itemsize == 4 or C >= V:  # no dh sum, or fp32 dh sums in the output itself
        return N, C
    half = chunk_budget(N, V) // 2
    R = max(ROW_ALIGN, half // (H * 4) // ROW_ALIGN * ROW_ALIGN)
    if need_dw:  # at most MAX_DW_BLOCKS roundings of dW, past the budget if need be
        R = max(R, triton.cdiv(triton.cdiv(N, MAX_DW_BLOCKS), ROW_ALIGN) * ROW_ALIGN)
    R = min(N, R)
    return R, chunk_columns(R, V, per_entry, half)


@functools.cache
def fp32_out_matmuls(device_type: str) -> bool:
    """Whether torch's mm and addmm take fp16/bf16 inputs with an fp32 output (and, for addmm, an fp32
    accumulator) on this device type: `out_dtype`, CUDA only, torch >= 2.8. Probed once with 1 x 1 tensors, so
    that the real calls' own errors are never mistaken for a missing feature."""
    if device_type != "cuda":
        return False
    f32 = dict(device=device_type, dtype=torch.float32)
    acc, one = torch.zeros((1, 1), **f32), torch.ones((1, 1), device=device_type, dtype=torch.bfloat16)
    try:
        torch.mm(one, one, out_dtype=torch.float32, out=torch.empty((1, 1), **f32))
        torch.addmm(acc, one, one, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError):  # no out_dtype overload (torch < 2.8), or its checks refuse an fp32 acc
        return False
    return True


def logits_chunk(hidden: torch.Tensor, w_chunk: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [N, C] fp32 = hidden [N, H] @ w_chunk [C, H]^T with fp32 accumulation and no rounding to the input
    dtype (on CUDA, fp16/bf16 inputs: torch.mm's out_dtype; fp32 follows torch's TF32 setting)."""
    if hidden.dtype == torch.float32:
        return torch.mm(hidden, w_chunk.T, out=out)
    if hidden.is_cuda:
        return torch.mm(hidden, w_chunk.T, out_dtype=torch.float32, out=out)
    return torch.mm(hidden.float(), w_chunk.float().T, out=out)  # CPU tensors (interpreter tests)


def _chunk_buffer(N: int, C: int, V: int, **options) -> torch.Tensor:
    """Flat storage for [N, width] chunks (width <= C), each viewed contiguous."""
    return torch.empty(N * min(C, V), **options)


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


def _check(backend: str, strategy: str, hidden: torch.Tensor) -> str:
    """The strategy to run (`resolve`d), after checking that it can."""
    if backend != "triton":
        raise RuntimeError(f"token_logprobs has no {backend!r} kernels (only triton); dispatch should not pick it")
    if strategy not in CHOICES:
        raise ValueError(f"token_logprobs has no strategy {strategy!r}; choose one of {STRATEGIES}")
    strategy = resolve(strategy, hidden)
    if strategy == "chunked" and hidden.is_cuda and hidden.dtype != torch.float32 and not fp32_out_matmuls("cuda"):
        raise RuntimeError(f"{ENV_STRATEGY}=chunked needs torch.mm(..., out_dtype=torch.float32) for "
                           f"{hidden.dtype} inputs (torch >= 2.8; this is {torch.__version__}); use the fused "
                           "strategy (unset it)")
    return strategy


@torch.library.custom_op("fusedrl::hidden_logprobs_fwd", mutates_args=())
@on_inputs_device
def hidden_logprobs_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    temperature: float, softcap: float, ignore_index: int, want_entropy: bool, backend: str, strategy: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (logp [N], entropy [N] or empty, lse [N]), fp32. softcap <= 0 means none."""
    strategy = _check(backend, strategy, hidden)
    N = hidden.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    logp, lse = torch.empty(N, **f32), torch.empty(N, **f32)
    entropy = torch.empty(N if want_entropy else 0, **f32)
    if N:
        run = _fused_fwd if strategy == "fused" else _chunked_fwd
        run(hidden, weight, bias, labels, 1.0 / temperature, softcap, ignore_index, want_entropy, logp, entropy, lse)
    return logp, entropy, lse


def _fused_fwd(hidden, weight, bias, labels, inv_temp, softcap, ignore_index, want_entropy, logp, entropy, lse):
    N, H = hidden.shape
    V = weight.shape[0]
    tiles = tiles_for(hidden)
    splits = vocab_splits(N, V, tiles, device_limits(hidden.device))
    split_cols = triton.cdiv(triton.cdiv(V, splits), tiles.block_v) * tiles.block_v
    splits = triton.cdiv(V, split_cols)
    part = torch.empty((4, splits, N) if splits > 1 else 0, device=hidden.device, dtype=torch.float32)
    hk._hidden_fwd_kernel[(triton.cdiv(N, tiles.block_n), splits)](
        hidden, weight, bias if bias is not None else weight, labels, logp, entropy if want_entropy else logp, lse,
        part, N, V, H, hidden.stride(0), weight.stride(0), inv_temp, softcap, ignore_index, split_cols,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, WANT_ENTROPY=want_entropy, SPLIT=splits > 1,
        BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_H=tiles.block_h,
        DOT_PRECISION=dot_precision(hidden.dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if splits > 1:
        hk._hidden_fwd_combine_kernel[(triton.cdiv(N, COMBINE_ROWS),)](
            part, labels, logp, entropy if want_entropy else logp, lse, N, V, splits, ignore_index,
            WANT_ENTROPY=want_entropy, BLOCK=COMBINE_ROWS,
        )


def _chunked_fwd(hidden, weight, bias, labels, inv_temp, softcap, ignore_index, want_entropy, logp, entropy, lse):
    N = hidden.shape[0]
    V = weight.shape[0]
    C = chunk_columns(N, V, 4)
    z_flat = _chunk_buffer(N, C, V, device=hidden.device, dtype=torch.float32)
    state = torch.empty((4, N) if C < V else 0, device=hidden.device, dtype=torch.float32)
    tiles = ck.row_tiles(device_limits(hidden.device))
    for v0 in range(0, V, C):
        width = min(C, V - v0)
        z = logits_chunk(hidden, weight[v0:v0 + width], z_flat[:N * width].view(N, width))
        ck._chunk_fold_kernel[(triton.cdiv(N, tiles.block_n),)](
            z, bias if bias is not None else z, labels, state, logp, entropy if want_entropy else logp, lse,
            N, V, v0, width, z.stride(0), inv_temp, softcap, ignore_index,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, WANT_ENTROPY=want_entropy, FIRST=v0 == 0,
            LAST=v0 + width >= V, BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, num_warps=tiles.num_warps,
        )


@hidden_logprobs_fwd.register_fake
def _(hidden, weight, bias, labels, temperature, softcap, ignore_index, want_entropy, backend, strategy):
    N = hidden.shape[0]
    f32 = dict(dtype=torch.float32)
    return hidden.new_empty(N, **f32), hidden.new_empty(N if want_entropy else 0, **f32), hidden.new_empty(N, **f32)


@torch.library.custom_op("fusedrl::hidden_logprobs_bwd", mutates_args=())
@on_inputs_device
def hidden_logprobs_bwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    lse: torch.Tensor, entropy: torch.Tensor, g_logp: torch.Tensor | None, g_entropy: torch.Tensor | None,
    temperature: float, softcap: float, ignore_index: int, need_dh: bool, need_dw: bool, need_db: bool,
    backend: str, strategy: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dhidden [N, H] like hidden or empty, dweight [V, H] like weight or empty, dbias [V] or empty)."""
    strategy = _check(backend, strategy, hidden)
    N, H = hidden.shape
    V = weight.shape[0]
    chunked = strategy == "chunked"
    R, C = backward_blocks(N, H, V, hidden.element_size(), chunked, need_dw, need_dh)
    several = C < V
    dh = hidden.new_empty((N, H)) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.zeros(V, device=hidden.device, dtype=torch.float32) if need_db else None
    if N and (need_dh or need_dw or need_db):
        dz_flat = _chunk_buffer(R, C, V, device=hidden.device, dtype=hidden.dtype)
        z_flat = _chunk_buffer(R, C, V, device=hidden.device, dtype=torch.float32) if chunked else None
        # fp16/bf16 dh over several chunks: summed in fp32, rounded once; fp32 (or one chunk) sums in place.
        acc = None
        if need_dh and several and hidden.dtype != torch.float32:
            acc = torch.empty((R, H), device=hidden.device, dtype=torch.float32)
        tiles = ck.row_tiles(device_limits(hidden.device)) if chunked else tiles_for(hidden)
        flags = dict(HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, HAS_G_LOGP=g_logp is not None,
                     HAS_G_ENTROPY=g_entropy is not None)
        for r0 in range(0, N, R):
            rows = min(R, N - r0)
            h = hidden[r0:r0 + rows]
            grads = [t[r0:r0 + rows] for t in (labels, lse, entropy if g_entropy is not None else lse,
                                               g_logp if g_logp is not None else lse,
                                               g_entropy if g_entropy is not None else lse)]
            dh_rows = None
            if need_dh:
                dh_rows = acc[:rows].zero_() if acc is not None else dh[r0:r0 + rows].zero_()
            for v0 in range(0, V, C):
                width = min(C, V - v0)
                w_chunk = weight[v0:v0 + width]
                dz = dz_flat[:rows * width].view(rows, width)
                if chunked:
                    z = logits_chunk(h, w_chunk, z_flat[:rows * width].view(rows, width))
                    ck._chunk_dz_kernel[(triton.cdiv(rows, tiles.block_n), triton.cdiv(width, tiles.block_v))](
                        z, bias if bias is not None else z, *grads, dz, rows, v0, width, z.stride(0), dz.stride(0),
                        1.0 / temperature, softcap, ignore_index, **flags, BLOCK_N=tiles.block_n,
                        BLOCK_V=tiles.block_v, num_warps=tiles.num_warps,
                    )
                else:
                    hk._hidden_dz_kernel[(triton.cdiv(rows, tiles.block_n), triton.cdiv(width, tiles.block_v))](
                        h, weight, bias if bias is not None else weight, *grads, dz,
                        rows, V, H, v0, width, h.stride(0), weight.stride(0), dz.stride(0), 1.0 / temperature,
                        softcap, ignore_index, **flags, BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v,
                        BLOCK_H=tiles.block_h, DOT_PRECISION=dot_precision(hidden.dtype), num_warps=tiles.num_warps,
                        num_stages=tiles.num_stages,
                    )
                if need_dw:  # the chunk's weight gradient, summed over the row blocks in the weight's dtype
                    if r0 == 0:
                        torch.mm(dz.T, h, out=dw[v0:v0 + width])
                    else:
                        dw[v0:v0 + width].addmm_(dz.T, h)
                if need_db:
                    db[v0:v0 + width] += dz.sum(0, dtype=torch.float32)
                if need_dh:
                    add_matmul(dh_rows, dz, w_chunk)
            if acc is not None:
                dh[r0:r0 + rows].copy_(dh_rows)
    elif need_dw:
        dw.zero_()
    # Outputs must not alias each other: a fresh empty tensor for each one not computed.
    return (dh if need_dh else weight.new_empty(0), dw if need_dw else weight.new_empty(0),
            db.to(bias.dtype) if need_db else weight.new_empty(0))


@hidden_logprobs_bwd.register_fake
def _(hidden, weight, bias, labels, lse, entropy, g_logp, g_entropy, temperature, softcap, ignore_index, need_dh,
      need_dw, need_db, backend, strategy):
    return (hidden.new_empty(hidden.shape) if need_dh else weight.new_empty(0),
            torch.empty_like(weight) if need_dw else weight.new_empty(0),
            torch.empty_like(bias) if need_db else weight.new_empty(0))


def add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, the product never rounded to the inputs' dtype first (rounding each vocabulary chunk's
    product to bf16 before summing biases training: TRL found the entropy drifting lower). An fp32 `acc` with
    fp16/bf16 `a`, `b`: torch's addmm with out_dtype=float32 where it exists (CUDA, torch >= 2.8); elsewhere an
    fp32 matmul of upcast copies (on a GPU with older torch these copies come on top of the chunk budget)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif fp32_out_matmuls(acc.device.type):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class HiddenLogprobs(torch.autograd.Function):
    """(hidden [N, H], weight [V, H], bias, labels [N]) -> (logp [N], entropy [N] or empty)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, softcap, ignore_index, want_entropy, backend,
                strategy):
        logp, entropy, lse = hidden_logprobs_fwd(hidden, weight, bias, labels, temperature, softcap, ignore_index,
                                                 want_entropy, backend, strategy)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.args = (temperature, softcap, ignore_index)
        ctx.want_entropy = want_entropy
        ctx.kernels = (backend, strategy)
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
                                         softcap, ignore_index, need_dh, need_dw, need_db, *ctx.kernels)
        return (dh if need_dh else None, dw if need_dw else None, db if need_db else None,
                None, None, None, None, None, None, None)
