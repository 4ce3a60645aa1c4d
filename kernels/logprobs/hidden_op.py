"""Custom ops `fusedrl::hidden_logprobs_fwd` / `_bwd` over the Triton kernels, paired for autograd by
`HiddenLogprobs`. Layout: hidden [N, H] (rows may be strided, H contiguous), weight [V, H]
contiguous, bias [V] or None, labels [N] int.
"""

from __future__ import annotations

import torch
import triton

from . import hidden_triton as hk


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
        hk._hidden_fwd_kernel[(triton.cdiv(N, hk.BLOCK_N),)](
            hidden, weight, bias if bias is not None else weight, labels, logp, entropy if want_entropy else logp, lse,
            N, V, H, hidden.stride(0), weight.stride(0), 1.0 / temperature, softcap, ignore_index,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, WANT_ENTROPY=want_entropy,
            BLOCK_N=hk.BLOCK_N, BLOCK_V=hk.BLOCK_V, BLOCK_H=hk.BLOCK_H, num_warps=hk.NUM_WARPS,
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
    temperature: float, softcap: float, ignore_index: int, need_dw: bool, need_db: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dhidden [N, H] like hidden, dweight [V, H] like weight or empty, dbias [V] or empty)."""
    _check_backend(backend)
    N, H = hidden.shape
    V = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    # fp32 accumulators for the atomics; dW only when the head is trained
    dh = torch.zeros((N, H), **f32)
    dw = torch.zeros((V, H) if need_dw else (0,), **f32)
    db = torch.zeros(V if need_db else 0, **f32)
    if N:
        grid = (triton.cdiv(N, hk.BLOCK_N), triton.cdiv(V, hk.BLOCK_V))
        hk._hidden_bwd_kernel[grid](
            hidden, weight, bias if bias is not None else weight, labels, lse,
            entropy if g_entropy is not None else lse, g_logp if g_logp is not None else lse,
            g_entropy if g_entropy is not None else lse,
            dh, dw if need_dw else dh, db if need_db else dh,
            N, V, H, hidden.stride(0), weight.stride(0), 1.0 / temperature, softcap, ignore_index,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, HAS_G_LOGP=g_logp is not None,
            HAS_G_ENTROPY=g_entropy is not None, NEED_DH=True, NEED_DW=need_dw, NEED_DB=need_db,
            BLOCK_N=hk.BLOCK_N, BLOCK_V=hk.BLOCK_V, BLOCK_H=hk.BLOCK_H, num_warps=hk.NUM_WARPS,
        )
    return (dh.to(hidden.dtype), dw.to(weight.dtype) if need_dw else weight.new_empty(0),
            db.to(bias.dtype) if need_db else weight.new_empty(0))


@hidden_logprobs_bwd.register_fake
def _(hidden, weight, bias, labels, lse, entropy, g_logp, g_entropy, temperature, softcap, ignore_index, need_dw,
      need_db, backend):
    return (torch.empty_like(hidden), torch.empty_like(weight) if need_dw else weight.new_empty(0),
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
        need_dw = ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        g_entropy = g_entropy.contiguous() if ctx.want_entropy and g_entropy is not None else None
        g_logp = None if g_logp is None else g_logp.contiguous()
        dh, dw, db = hidden_logprobs_bwd(hidden, weight, bias, labels, lse, entropy, g_logp, g_entropy, temperature,
                                         softcap, ignore_index, need_dw, need_db, ctx.backend)
        return (dh if ctx.needs_input_grad[0] else None, dw if need_dw else None, db if need_db else None,
                None, None, None, None, None, None)
