"""Public log-probability functions: validation, dispatch."""

from __future__ import annotations

import math

import torch

from .. import dispatch
from . import hidden_op, hidden_reference, reference
from .hidden_op import HiddenLogprobs
from .op import LogprobsFromLogits

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int32, torch.int64)

SPEC = dispatch.register_op(
    dispatch.OpSpec(name="logprobs_from_logits",
                    backends=(dispatch.Backend.TORCH, dispatch.Backend.TRITON, dispatch.Backend.CUDA))
)
HIDDEN_SPEC = dispatch.register_op(
    dispatch.OpSpec(name="token_logprobs", backends=(dispatch.Backend.TORCH, dispatch.Backend.TRITON))
)


def _check_labels(labels, leading: tuple[int, ...], V: int, ignore_index, device, what: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in INTS:
        raise TypeError(f"labels must be an int32 or int64 tensor, got {labels.dtype}")
    if tuple(labels.shape) != leading:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but {what} needs {leading}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but {what.split()[0]} is on {device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    # Label range: checked where it is free (CPU tensors, outside torch.compile); on a GPU the kernels
    # return NaN for a label outside [0, V) instead of reading out of bounds.
    if labels.device.type == "cpu" and not torch.compiler.is_compiling() and labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bad.any():
            raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}; got "
                             f"{labels[bad][:5].tolist()} (vocabulary size V = {V})")


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return float(value)


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor (fp16, bf16, fp32 or fp64), got {t.dtype}")


def _check(logits, labels, temperature, ignore_index) -> None:
    _check_float("logits", logits)
    if logits.ndim not in (2, 3) or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape [N, V] or [B, T, V] with V >= 1, got {tuple(logits.shape)}")
    _check_labels(labels, tuple(logits.shape[:-1]), logits.shape[-1], ignore_index, logits.device,
                  f"logits {tuple(logits.shape)}")
    _check_positive("temperature", temperature)


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


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label (and the entropy) straight from hidden states and the LM head,
    never allocating the [N, V] logits.

    Args:
        hidden: [N, H] or [B, T, H] final hidden states, fp32/fp16/bf16 (rows may be strided).
        weight: [V, H] LM head weight, same dtype as hidden. When it does not require grad (frozen
            head, LoRA), no weight gradient is computed.
        labels: [N] or [B, T] int32/int64 token ids in [0, V) or `ignore_index`.
        bias: optional [V] LM head bias.
        temperature: the sampling temperature the logits are divided by.
        softcap: Gemma-style soft-capping of the raw logits, softcap * tanh(logits / softcap),
            applied before the temperature.
        return_entropy: also return the entropy of the token distribution.

    Returns:
        logp [N] or [B, T] fp32 (fp64 for fp64 input), or (logp, entropy). Ignored positions are 0
        with no gradient. Gradients flow to hidden, weight (if it requires grad) and bias.

    Equivalent PyTorch:
        logits = hidden.float() @ weight.float().T + bias   # then softcap, then / temperature
        logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    """
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if hidden.ndim not in (2, 3) or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have shape [N, H] or [B, T, H] with H >= 1, got {tuple(hidden.shape)}")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [V, H] = [V, {hidden.shape[-1]}] with V >= 1, got "
                         f"{tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight is {weight.dtype} but hidden is {hidden.dtype}; cast one of them")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    V = weight.shape[0]
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (V,) or bias.device != hidden.device:
            raise ValueError(f"bias must have shape [V] = [{V}] on {hidden.device}, got {tuple(bias.shape)} on "
                             f"{bias.device}")
    _check_labels(labels, tuple(hidden.shape[:-1]), V, ignore_index, hidden.device,
                  f"hidden {tuple(hidden.shape)}")
    temperature = _check_positive("temperature", temperature)
    if softcap is not None:
        softcap = _check_positive("softcap", softcap)

    h2 = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    tensors = [hidden, weight] + ([bias] if bias is not None else [])
    if dispatch.select(HIDDEN_SPEC, tensors) is dispatch.Backend.TORCH:
        logp, entropy = hidden_reference.ChunkedHiddenLogprobs.apply(h2, weight, bias, flat_labels, temperature,
                                                                     softcap, ignore_index)
    else:
        if h2.stride(-1) != 1:
            h2 = h2.contiguous()
        logp, entropy = HiddenLogprobs.apply(h2, weight.contiguous(), None if bias is None else bias.contiguous(),
                                             flat_labels.contiguous(), temperature,
                                             softcap or 0.0, ignore_index, return_entropy, "triton",
                                             hidden_op.strategy())
    logp = logp.reshape(labels.shape)
    return (logp, entropy.reshape(labels.shape)) if return_entropy else logp
