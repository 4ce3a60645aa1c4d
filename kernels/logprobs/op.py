"""Custom ops `fusedrl::logprobs_fwd` / `fusedrl::logprobs_bwd` over the Triton kernels or the CUDA
extension (csrc/logprobs.cu), as the `backend` argument says, paired for autograd by `LogprobsFromLogits`.

Layout: logits [B, T, V] with a contiguous vocabulary (rows may be strided), labels [B, T] int.
"""

from __future__ import annotations

import torch

from ..device_guard import on_inputs_device
from . import triton_kernels as tk

EMPTY = (0,)


def _check_backend(backend: str) -> None:
    if backend not in ("triton", "cuda"):
        raise RuntimeError(f"logprobs ops have no {backend!r} kernels (triton and cuda); dispatch should not pick it")


@torch.library.custom_op("fusedrl::logprobs_fwd", mutates_args=())
@on_inputs_device
def logprobs_fwd(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int, want_entropy: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (logp [B, T] fp32, entropy [B, T] fp32 or empty, lse [B, T] fp32)."""
    _check_backend(backend)
    if backend == "cuda":
        from .. import cuda_ext

        return tuple(cuda_ext.ops().logprobs_fwd(logits, labels, temperature, ignore_index, want_entropy))
    B, T, V = logits.shape
    logp = torch.empty((B, T), device=logits.device, dtype=torch.float32)
    lse = torch.empty((B, T), device=logits.device, dtype=torch.float32)
    entropy = torch.empty((B, T) if want_entropy else EMPTY, device=logits.device, dtype=torch.float32)
    if B * T:
        tk._logprobs_fwd_kernel[(B * T,)](
            logits, labels, logp, entropy if want_entropy else logp, lse,
            T, V, logits.stride(0), logits.stride(1), 1.0 / temperature, ignore_index,
            WANT_ENTROPY=want_entropy, BLOCK_V=tk.BLOCK_V, num_warps=tk.NUM_WARPS,
        )
    return logp, entropy, lse


@logprobs_fwd.register_fake
def _(logits, labels, temperature, ignore_index, want_entropy, backend):
    B, T, _ = logits.shape
    f32 = dict(dtype=torch.float32)
    return (logits.new_empty((B, T), **f32), logits.new_empty((B, T) if want_entropy else EMPTY, **f32),
            logits.new_empty((B, T), **f32))


@torch.library.custom_op("fusedrl::logprobs_bwd", mutates_args=())
@on_inputs_device
def logprobs_bwd(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
    g_logp: torch.Tensor | None, g_entropy: torch.Tensor | None, temperature: float, ignore_index: int,
    backend: str,
) -> torch.Tensor:
    """-> grad of logits, [B, T, V] contiguous in logits.dtype."""
    _check_backend(backend)
    if backend == "cuda":
        from .. import cuda_ext

        return cuda_ext.ops().logprobs_bwd(logits, labels, lse, entropy, g_logp, g_entropy, temperature, ignore_index)
    B, T, V = logits.shape
    grad = torch.empty((B, T, V), device=logits.device, dtype=logits.dtype)
    if B * T:
        tk._logprobs_bwd_kernel[(B * T,)](
            logits, labels, lse, entropy if g_entropy is not None else lse,
            g_logp if g_logp is not None else lse, g_entropy if g_entropy is not None else lse, grad,
            T, V, logits.stride(0), logits.stride(1), 1.0 / temperature, ignore_index,
            HAS_G_LOGP=g_logp is not None, HAS_G_ENTROPY=g_entropy is not None, BLOCK_V=tk.BLOCK_V,
            num_warps=tk.NUM_WARPS,
        )
    return grad


@logprobs_bwd.register_fake
def _(logits, labels, lse, entropy, g_logp, g_entropy, temperature, ignore_index, backend):
    return logits.new_empty(logits.shape)


class LogprobsFromLogits(torch.autograd.Function):
    """(logits [B, T, V], labels [B, T]) -> (logp [B, T], entropy [B, T] or empty); backward by recompute."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, want_entropy, backend):
        logp, entropy, lse = logprobs_fwd(logits, labels, temperature, ignore_index, want_entropy, backend)
        ctx.save_for_backward(logits, labels, lse, entropy)
        ctx.args = (temperature, ignore_index, backend)
        ctx.want_entropy = want_entropy
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        logits, labels, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, backend = ctx.args
        g_entropy = g_entropy.contiguous() if ctx.want_entropy and g_entropy is not None else None
        g_logp = None if g_logp is None else g_logp.contiguous()
        grad = logprobs_bwd(logits, labels, lse, entropy, g_logp, g_entropy, temperature, ignore_index, backend)
        return grad, None, None, None, None, None
