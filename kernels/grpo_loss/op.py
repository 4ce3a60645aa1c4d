"""Custom op `fusedrl::grpo_rows` over the Triton kernel or the CUDA extension (csrc/grpo_loss.cu), as
the `backend` argument says, and `GRPOLoss`, the autograd pairing that turns its row sums into the
loss of each normalization and the gradient.

The loss is a scalar, so the forward computes the whole gradient dloss/dlogp ([B, T] fp32) and the
backward only scales it by the incoming gradient: one pass over the tokens in all.
"""

from __future__ import annotations

import torch

from ..device_guard import on_inputs_device
from . import triton_kernels as tk


def _check_backend(backend: str) -> None:
    if backend not in ("triton", "cuda"):
        raise RuntimeError(f"grpo_loss has no {backend!r} kernel (triton and cuda); dispatch should not pick it")


@torch.library.custom_op("fusedrl::grpo_rows", mutates_args=())
@on_inputs_device
def grpo_rows(
    logp: torch.Tensor, old_logp: torch.Tensor | None, advantages: torch.Tensor, mask: torch.Tensor,
    ref_logp: torch.Tensor | None, entropy: torch.Tensor | None,
    eps_low: float, eps_high: float, delta: float, beta: float, tau_pos: float, tau_neg: float,
    loss_kind: int, kl_kind: int, sequence: bool, has_delta: bool, bias_correction: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] inputs (advantages [B] or [B, T]) -> (m dl/dlogp [B, T] fp32, row sums [B, NSTAT] fp32)."""
    _check_backend(backend)
    if backend == "cuda":
        from .. import cuda_ext

        return tuple(cuda_ext.ops().grpo_rows(
            logp, old_logp, advantages, mask, ref_logp, entropy, eps_low, eps_high, delta, beta, tau_pos, tau_neg,
            loss_kind, kl_kind, sequence, has_delta, bias_correction))
    B, T = logp.shape
    grad = torch.empty((B, T), device=logp.device, dtype=torch.float32)
    stats = torch.empty((B, tk.NSTAT), device=logp.device, dtype=torch.float32)
    if B:
        tk._grpo_row_kernel[(B,)](
            logp, old_logp if old_logp is not None else logp, advantages, mask,
            ref_logp if ref_logp is not None else logp, entropy if entropy is not None else logp, grad, stats,
            T, eps_low, eps_high, delta, beta, tau_pos, tau_neg,
            LOSS=loss_kind, KL=kl_kind, HAS_OLD=old_logp is not None, ADV_PER_TOKEN=advantages.dim() == 2,
            SEQUENCE=sequence, HAS_DELTA=has_delta, HAS_KL=ref_logp is not None, BIAS_CORRECTION=bias_correction,
            HAS_ENTROPY=entropy is not None, NSTAT=tk.NSTAT, BLOCK_T=tk.BLOCK_T, num_warps=4,
        )
    return grad, stats


@grpo_rows.register_fake
def _(logp, old_logp, advantages, mask, ref_logp, entropy, eps_low, eps_high, delta, beta, tau_pos, tau_neg,
      loss_kind, kl_kind, sequence, has_delta, bias_correction, backend):
    B, T = logp.shape
    return logp.new_empty((B, T), dtype=torch.float32), logp.new_empty((B, tk.NSTAT), dtype=torch.float32)


def row_scale(loss_type: str, counts: torch.Tensor, max_len: int | None, num_items) -> torch.Tensor:
    """[B] d loss / d (row sum of l m): the normalization of each loss type (see DESIGN.md)."""
    B = counts.shape[0]
    if loss_type in ("grpo", "sapo"):
        return 1.0 / (B * counts.clamp(min=1.0))
    if loss_type == "bnpo":
        return (1.0 / counts.sum().clamp(min=1.0)).expand(B)
    if loss_type == "dr_grpo":
        return counts.new_full((B,), 1.0 / (B * max_len))
    if loss_type in ("dapo", "cispo"):
        total = counts.sum() if num_items is None else torch.as_tensor(num_items, dtype=counts.dtype,
                                                                        device=counts.device)
        return (1.0 / total.clamp(min=1.0)).expand(B)
    return counts.new_full((B,), 1.0 / B)  # luspo


class GRPOLoss(torch.autograd.Function):
    """logp [B, T] -> (loss [], row sums [B, NSTAT]); the gradient flows to logp only."""

    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, ref_logp, entropy, kernel_args, loss_type, max_len,
                num_items):
        grad, stats = grpo_rows(logp, old_logp, advantages, mask, ref_logp, entropy, *kernel_args)
        counts = stats[:, 1]
        scale = row_scale(loss_type, counts, max_len, num_items)
        loss = (stats[:, 0] * scale).sum()
        if kernel_args[8]:  # GSPO: every token of a row also moves the row's weight, dw/dlogp_t = m_t / count
            grad = grad + mask.to(grad.dtype) * (stats[:, 7] / counts.clamp(min=1.0)).unsqueeze(1)
        ctx.save_for_backward(grad * scale.unsqueeze(1))
        ctx.logp_dtype = logp.dtype
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, g_stats):
        (grad,) = ctx.saved_tensors
        return (g_loss * grad).to(ctx.logp_dtype), None, None, None, None, None, None, None, None, None
