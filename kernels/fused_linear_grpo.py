"""`fused_linear_grpo_loss`: the GRPO loss straight from the policy's hidden states and LM head.

Composes `token_logprobs` (log-probs and entropy from hidden states, never the [N, V] logits) with
`grpo_loss` (one kernel per sequence): no [N, V] tensor. The forward is one Triton launch (plus a
combine) with the default strategy; the backward recomputes the logits once, one vocabulary chunk
at a time (a Python loop over chunks whose buffers stay under 1% of the fp32 logits, each a Triton
launch and one to three matmuls; see `kernels/logprobs/hidden_op.py`). Positions outside the
completion mask are scored as ignored labels, so they get no gradient.
"""

from __future__ import annotations

import torch

from .grpo_loss import grpo_loss
from .logprobs import token_logprobs


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    with_entropy: bool = True,
    **loss_options,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss from hidden states: `grpo_loss(token_logprobs(hidden, weight, labels), ...)`.

    Args:
        hidden: [B, T, H] hidden states at the completion positions (the state that predicts each
            completion token), fp32/fp16/bf16.
        weight: [V, H] LM head (frozen or trained; no weight gradient when it does not require grad).
        labels: [B, T] completion token ids; positions where `mask` is 0 are not scored.
        advantages: [B] or [B, T]; mask: [B, T] completion mask.
        old_logp, ref_logp: [B, T] log-probs at sampling time and under the reference model.
        bias, temperature, softcap: as in `token_logprobs`.
        with_entropy: also compute token entropies for the "entropy" metric.
        **loss_options: the keyword options of `grpo_loss` (loss_type, beta, eps_low, ...).

    Returns:
        (loss [] fp32, metrics) as `grpo_loss` returns them.
    """
    if isinstance(hidden, torch.Tensor) and hidden.ndim != 3:  # the loss needs its sequences
        raise ValueError(f"hidden must have shape [B, T, H] (sequences of completion positions), got "
                         f"{tuple(hidden.shape)}")
    if not isinstance(mask, torch.Tensor) or not isinstance(labels, torch.Tensor) or mask.shape != labels.shape:
        raise ValueError(f"mask must be a tensor shaped like labels {tuple(getattr(labels, 'shape', ()))}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    scored = torch.where(mask.bool(), labels, torch.full_like(labels, -100))
    out = token_logprobs(hidden, weight, scored, bias=bias, temperature=temperature, softcap=softcap,
                         return_entropy=with_entropy)
    logp, entropy = out if with_entropy else (out, None)
    return grpo_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, entropy=entropy, **loss_options)
