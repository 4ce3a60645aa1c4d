"""Public log-probability functions: validation, dispatch."""

from __future__ import annotations

import math

import torch

from .. import dispatch
from . import reference
from .op import LogprobsFromLogits

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int32, torch.int64)

SPEC = dispatch.register_op(
    dispatch.OpSpec(name="logprobs_from_logits",
                    backends=(dispatch.Backend.TORCH, dispatch.Backend.TRITON, dispatch.Backend.CUDA))
)


def _check(logits, labels, temperature, ignore_index) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOATS:
        raise TypeError(f"logits must be a floating-point tensor (fp16, bf16, fp32 or fp64), got {logits.dtype}")
    if logits.ndim not in (2, 3) or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [N, V] or [B, T, V] with V >= 1, got {tuple(logits.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in INTS:
        raise TypeError(f"labels must be an int32 or int64 tensor, got {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but logits {tuple(logits.shape)} needs "
                         f"{tuple(logits.shape[:-1])}")
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but logits is on {logits.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    # Label range: checked where it is free (CPU tensors, outside torch.compile); on a GPU the kernel
    # returns NaN for a label outside [0, V) instead of reading out of bounds.
    if labels.device.type == "cpu" and not torch.compiler.is_compiling() and labels.numel():
        V = logits.shape[-1]
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bad.any():
            raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}; got "
                             f"{labels[bad][:5].tolist()} (vocabulary size from logits.shape[-1])")


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label (and the entropy) from logits, one pass per row.

    Args:
        logits: [N, V] or [B, T, V], fp32/fp16/bf16 (math in fp32); the vocabulary dimension must be
            contiguous, rows may be strided (e.g. `logits[:, :-1]` needs no copy).
        labels: [N] or [B, T] int32/int64, in [0, V) or `ignore_index`.
        temperature: logits are divided by it (sampling temperature of the rollout).
        return_entropy: also return the entropy of softmax(logits / temperature).

    Returns:
        logp [N] or [B, T] fp32 (fp64 for fp64 logits), or (logp, entropy). Ignored positions are 0
        and get no gradient. Both are differentiable; the backward recomputes the softmax from the
        logits, so nothing [N, V] is kept besides the logits themselves.

    Equivalent PyTorch:
        logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
        logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    """
    _check(logits, labels, temperature, ignore_index)
    temperature = float(temperature)
    backend = dispatch.select(SPEC, [logits])
    if backend is dispatch.Backend.TORCH:
        logp, entropy = reference.ChunkedLogprobs.apply(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), temperature, ignore_index)
        logp, entropy = logp.reshape(labels.shape), entropy.reshape(labels.shape)
    else:
        logits3 = logits if logits.ndim == 3 else logits.unsqueeze(0)
        if logits3.stride(-1) != 1:
            logits3 = logits3.contiguous()
        labels2 = labels.reshape(logits3.shape[:-1]).contiguous()
        logp, entropy = LogprobsFromLogits.apply(logits3, labels2, temperature, ignore_index, return_entropy,
                                                 backend.value)
        logp = logp.reshape(labels.shape)
        entropy = entropy.reshape(labels.shape) if return_entropy else None
    return (logp, entropy) if return_entropy else logp
