"""Public GRPO loss: validation, dispatch, metrics."""

from __future__ import annotations

import math

import torch

from .. import dispatch
from . import reference
from . import triton_kernels as tk
from .op import GRPOLoss

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LOSS_KINDS = {**{name: tk.CLIP_FAMILY for name in reference.CLIP_FAMILY}, "cispo": tk.CISPO, "sapo": tk.SAPO}
KL_KINDS = {"k3": tk.KL_K3, "k2": tk.KL_K2, "k1": tk.KL_K1}
COLUMN = {name: i for i, name in enumerate(tk.STATS)}

SPEC = dispatch.register_op(
    dispatch.OpSpec(name="grpo_loss", backends=(dispatch.Backend.TORCH, dispatch.Backend.TRITON,
                                                    dispatch.Backend.CUDA),
                    auto_order=dispatch.TRITON_FIRST)  # measured faster than the CUDA kernels (dispatch.TRITON_FIRST)
)


def _float_tensor(name: str, t, shape: tuple[int, ...] | None, device: torch.device | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but must be {shape} (like logp)")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but logp is on {device}")


def _number(name: str, value, low: float = -math.inf, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite float, got {value!r}")
    if value < low or (strict and value == low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value}")
    return float(value)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    loss_type: str = "dapo",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    delta: float | None = None,
    importance_level: str = "token",
    use_bias_correction_kl: bool = True,
    kl_estimator: str = "k3",
    max_len: int | None = None,
    num_items: float | torch.Tensor | None = None,
    sapo_tau: tuple[float, float] = (1.0, 1.05),
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss family exactly as TRL 1.16's GRPOTrainer computes it, fused in one pass.

    Args:
        logp: [B, T] log-probs of the completion tokens under the policy (the only input that gets
            a gradient).
        old_logp: [B, T] log-probs at sampling time, or None (then logp.detach(), as TRL does).
        advantages: [B] (or TRL's [B, 1]) per sequence, or [B, T] per token (span-level feedback).
        mask: [B, T] completion mask (bool, int or float weights).
        ref_logp: [B, T] reference-model log-probs, needed when beta != 0.
        loss_type: "grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo" or "luspo".
        eps_low, eps_high, delta: clip range and two-sided clip (clip family); eps_high caps the
            CISPO weight.
        importance_level: "token", or "sequence" (GSPO: one weight per sequence).
        use_bias_correction_kl: multiply the KL term by the importance ratio (TRL's default).
        kl_estimator: "k3" (TRL's), "k2" = (ref - logp)^2 / 2, or "k1" = logp - ref.
        max_len: max completion length, the dr_grpo normalizer (required for it).
        num_items: tokens in the whole generation batch (dapo/cispo normalizer); default mask.sum().
        sapo_tau: (tau for A > 0, tau for A <= 0) of SAPO.
        entropy: [B, T] token entropies, for the "entropy" metric only.

    Returns:
        (loss [] fp32, metrics): metrics are 0-dim detached tensors: "ratio_mean", "kl" (beta != 0),
        "entropy" (given), "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"
        (clip family) or "cispo_clip_ratio" (cispo). TRL's trainer further divides the loss by the
        gradient-accumulation steps; that is the caller's to do.

    Equivalent PyTorch: `fusedrl.kernels.grpo_loss.reference.grpo_loss` (TRL's code, restated).
    """
    _float_tensor("logp", logp, None, None)
    if logp.ndim != 2:
        raise ValueError(f"logp must have shape [B, T], got {tuple(logp.shape)}")
    shape, device = tuple(logp.shape), logp.device
    if old_logp is not None:
        _float_tensor("old_logp", old_logp, shape, device)
    _float_tensor("advantages", advantages, None, device)
    if tuple(advantages.shape) == (shape[0], 1):  # TRL's own layout of per-sequence advantages
        advantages = advantages.view(shape[0])
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(f"advantages must have shape [B] = {shape[:1]}, [B, 1] or [B, T] = {shape}, "
                         f"got {tuple(advantages.shape)}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape or mask.device != device:
        raise ValueError(f"mask must be a tensor of shape {shape} on {device}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if loss_type not in reference.LOSS_TYPES:
        extra = " ('vespo' is not supported: its gamma weights need TRL's vLLM importance ratios)" \
            if loss_type == "vespo" else ""
        raise ValueError(f"loss_type must be one of {list(reference.LOSS_TYPES)}, got {loss_type!r}{extra}")
    if importance_level not in ("token", "sequence"):
        raise ValueError(f"importance_level must be 'token' or 'sequence', got {importance_level!r}")
    if kl_estimator not in KL_KINDS:
        raise ValueError(f"kl_estimator must be one of {list(KL_KINDS)}, got {kl_estimator!r}")
    beta = _number("beta", beta, 0.0)
    eps_low = _number("eps_low", eps_low, 0.0)
    eps_high = _number("eps_high", eps_high, 0.0)
    if delta is not None:
        delta = _number("delta", delta, 0.0, strict=True)
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("ref_logp is required when beta != 0 (the KL term needs the reference log-probs)")
        _float_tensor("ref_logp", ref_logp, shape, device)
    if entropy is not None:
        _float_tensor("entropy", entropy, shape, device)
    if loss_type == "dr_grpo" and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"max_len must be a positive int for loss_type='dr_grpo', got {max_len!r}")
    if isinstance(num_items, torch.Tensor):  # a count gathered across processes (TRL's num_items_in_batch)
        if num_items.numel() != 1 or num_items.is_complex():
            raise ValueError(f"num_items must be a number or a one-element tensor, got shape "
                             f"{tuple(num_items.shape)}")
        if num_items.device.type == "cpu" and not num_items.item() > 0:  # (on a GPU: no sync to check it)
            raise ValueError(f"num_items must be > 0, got {num_items.item()}")
        num_items = num_items.detach().reshape(()).to(device)
    elif num_items is not None:
        num_items = _number("num_items", num_items, 0.0, strict=True)
    if not isinstance(sapo_tau, (tuple, list)) or len(sapo_tau) != 2:
        raise ValueError(f"sapo_tau must be a pair (tau_pos, tau_neg), got {sapo_tau!r}")
    tau_pos, tau_neg = (_number("sapo_tau", t, 0.0, strict=True) for t in sapo_tau)

    ref_logp = ref_logp if beta != 0.0 else None
    # logp is the only input the loss differentiates, on every backend (old log-probs, advantages, reference
    # log-probs and entropies are data, as in TRL, where they come from no-grad passes)
    old_logp, advantages, ref_logp, entropy = (None if t is None else t.detach()
                                               for t in (old_logp, advantages, ref_logp, entropy))
    tensors = [t for t in (logp, old_logp, advantages, ref_logp, entropy) if t is not None]
    backend = dispatch.select(SPEC, tensors)
    if backend is dispatch.Backend.TORCH:
        return reference.grpo_loss(
            logp, old_logp, advantages, mask, ref_logp=ref_logp, beta=beta, loss_type=loss_type, eps_low=eps_low,
            eps_high=eps_high, delta=delta, importance_level=importance_level,
            use_bias_correction_kl=use_bias_correction_kl, kl_estimator=kl_estimator, max_len=max_len,
            num_items=num_items, sapo_tau=(tau_pos, tau_neg), entropy=entropy)

    sequence = importance_level == "sequence"
    kernel_args = (eps_low, eps_high, delta if delta is not None else 0.0, beta, tau_pos, tau_neg,
                   LOSS_KINDS[loss_type], KL_KINDS[kl_estimator], sequence, delta is not None,
                   bool(use_bias_correction_kl), backend.value)
    cont = lambda t: None if t is None else t.contiguous()
    mask_f = mask.to(torch.float32).contiguous()
    loss, stats = GRPOLoss.apply(logp.contiguous(), cont(old_logp), advantages.contiguous(), mask_f, cont(ref_logp),
                                 cont(entropy), kernel_args, loss_type, max_len, num_items)
    return loss, _metrics(stats, loss_type, advantages, sequence, eps_low, eps_high, delta, beta != 0.0,
                          entropy is not None)


def _metrics(stats, loss_type, advantages, sequence, eps_low, eps_high, delta, has_kl, has_entropy):
    """TRL's logged means from the kernel's row sums: per-token values over the masked tokens;
    per-sequence values (GSPO ratios with per-sequence advantages) over the sequences."""
    col = lambda name: stats[:, COLUMN[name]]
    tokens = col("count").sum().clamp(min=1.0)
    token_mean = lambda name: col(name).sum() / tokens
    per_sequence = sequence and advantages.dim() == 1
    ratio_row = torch.exp(col("w_row"))
    metrics = {"ratio_mean": ratio_row.mean() if sequence else token_mean("ratio")}
    if has_kl:
        metrics["kl"] = token_mean("kl")
    if has_entropy:
        metrics["entropy"] = token_mean("entropy")
    adv = advantages.to(torch.float32)
    if loss_type in reference.CLIP_FAMILY:
        if per_sequence:  # TRL counts clipping on the ratio after the delta clamp
            clipped = ratio_row if delta is None else ratio_row.clamp(max=delta)
            low = ((clipped < 1 - eps_low) & (adv < 0)).float().mean()
            high = ((clipped > 1 + eps_high) & (adv > 0)).float().mean()
        else:
            low, high = token_mean("low"), token_mean("high")
        metrics.update({"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low + high})
    elif loss_type == "cispo":
        metrics["cispo_clip_ratio"] = (((ratio_row > eps_high) & (adv > 0)).float().mean() if per_sequence
                                       else token_mean("cispo"))
    return {name: value.detach() for name, value in metrics.items()}
