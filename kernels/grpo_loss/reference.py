"""Torch reference of the GRPO loss family, written as TRL 1.16's `GRPOTrainer._compute_loss` computes
it (DESIGN.md, "GRPO loss"): the oracle for the kernels and the CPU path.

Inputs are [B, T] (advantages [B] or [B, T]); the loss is a 0-dim tensor in the compute dtype
(fp32, fp64 for fp64 input); metrics are 0-dim detached tensors, as TRL logs them on one process.
TRL's trainer also divides by the gradient-accumulation steps; that scaling is the caller's.
"""

from __future__ import annotations

import torch

CLIP_FAMILY = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
LOSS_TYPES = CLIP_FAMILY + ("cispo", "sapo")


def kl_term(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from log-probs: k3 (TRL's), k2 or k1."""
    d = ref_logp - logp
    if estimator == "k3":
        return torch.exp(d) - d - 1
    if estimator == "k2":
        return 0.5 * d**2
    return -d  # k1


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None,
    beta: float,
    loss_type: str,
    eps_low: float,
    eps_high: float,
    delta: float | None,
    importance_level: str,
    use_bias_correction_kl: bool,
    kl_estimator: str,
    max_len: int | None,
    num_items: float | torch.Tensor | None,
    sapo_tau: tuple[float, float],
    entropy: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ct = torch.float64 if logp.dtype == torch.float64 else torch.float32
    logp = logp.to(ct)
    old_logp = logp.detach() if old_logp is None else old_logp.to(ct)
    mask = mask.to(ct)
    advantages = advantages.to(ct)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)

    log_ratio = logp - old_logp
    if importance_level == "token":
        log_w = log_ratio
    else:  # "sequence" (GSPO): one weight per sequence, the masked mean of the token log-ratios
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_w)

    per_token_kl = None
    if beta != 0.0:
        per_token_kl = kl_term(logp, ref_logp.to(ct), kl_estimator)
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    ratio = coef_1  # "ratio_mean" is taken before the delta clamp; TRL's clip counts after it
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * advantages * logp
    elif loss_type in CLIP_FAMILY:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if delta is not None:  # two-sided clipping
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    else:  # "sapo"
        tau = torch.where(advantages > 0, sapo_tau[0], sapo_tau[1])
        per_token_loss = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * advantages
    if per_token_kl is not None:
        per_token_loss = per_token_loss + beta * per_token_kl

    masked = per_token_loss * mask
    if loss_type in ("grpo", "sapo"):
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (per_token_loss.size(0) * max_len)
    elif loss_type in ("dapo", "cispo"):
        normalizer = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=ct, device=mask.device)
        loss = masked.sum() / normalizer.clamp(min=1.0)
    else:  # "luspo"
        loss = masked.sum(-1).mean()

    return loss, _metrics(loss_type, per_token_kl, ratio, coef_1, advantages, mask, eps_low, eps_high, entropy,
                          importance_level == "sequence")


def _metrics(loss_type, per_token_kl, ratio, clipped_ratio, advantages, mask, eps_low, eps_high, entropy, sequence):
    """`clipped_ratio` is the ratio after the two-sided `delta` clamp: TRL counts clipping on it.

    TRL's `global_masked_mean` on one process: per-sequence values (the [B, 1] weights of sequence-level ratios,
    and what is derived from them) are averaged over sequences, per-token values over the tokens the mask keeps.
    Which is which follows `sequence` (importance_level), not the shape: with completions one token wide a token
    level [B, 1] value is per token (TRL's shape test averages it over masked rows too)."""

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if sequence and x.shape[1] == 1:
            return x.sum() / max(x.shape[0], 1)
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    metrics = {"ratio_mean": masked_mean(ratio)}
    if per_token_kl is not None:
        metrics["kl"] = masked_mean(per_token_kl)
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy.to(mask.dtype))
    if loss_type in CLIP_FAMILY:
        low = ((clipped_ratio < 1 - eps_low) & (advantages < 0)).to(mask.dtype)
        high = ((clipped_ratio > 1 + eps_high) & (advantages > 0)).to(mask.dtype)
        metrics["clip_ratio/low_mean"] = masked_mean(low)
        metrics["clip_ratio/high_mean"] = masked_mean(high)
        metrics["clip_ratio/region_mean"] = masked_mean(torch.maximum(low, high))
    elif loss_type == "cispo":
        metrics["cispo_clip_ratio"] = masked_mean(((ratio > eps_high) & (advantages > 0)).to(mask.dtype))
    return metrics
