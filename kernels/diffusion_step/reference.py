"""Torch reference of the diffusion transition steps: the oracle for tests and the CPU path.

These are the trainers' own formulas written out plainly (DESIGN.md, "Contracts worth knowing"),
with autograd doing the backward. Math runs in fp32 (fp64 when the inputs are fp64, which is how the
tests build their float64 oracle). Inputs here are already validated by `api.py`:
`x`, `model_output` [B, ...]; per-sample parameters [B]; `noise` drawn, or `prev_sample` given.

Returns (prev_sample, logp, mean, std, kl) with prev_sample/mean in `out_dtype`, logp/kl/std [B] in
the compute dtype; `logp` is None when `want_logp` is False, `kl` None without `ref_mean`.
"""

from __future__ import annotations

import math

import torch

LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))


def _gaussian_logp(prev: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """MEAN over non-batch dims of log N(prev; mean, scale^2), prev treated as data."""
    lp = -((prev.detach() - mean) ** 2) / (2 * scale**2) - torch.log(scale) - LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def _finish(mean, scale, std, noise, prev_sample, ref_mean, want_logp, logp_fn, out_dtype):
    if prev_sample is None:
        prev = mean + scale * noise.to(mean.dtype)
    else:
        prev = prev_sample.to(mean.dtype)
    logp = logp_fn(prev, mean) if want_logp else None
    kl = None
    if ref_mean is not None:
        dims = tuple(range(1, mean.ndim))
        kl = ((mean - ref_mean.to(mean.dtype)) ** 2).mean(dim=dims) / (2 * std.reshape(-1) ** 2)
    out_prev = prev.to(out_dtype) if prev_sample is None else prev_sample
    return out_prev, logp, mean.to(out_dtype), std.reshape(-1), kl


def flow_sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    *,
    noise_level: float,
    sde_type: str,
    sigma_max: float,
    noise: torch.Tensor | None,
    prev_sample: torch.Tensor | None,
    ref_mean: torch.Tensor | None,
    want_logp: bool,
    out_dtype: torch.dtype,
):
    """Flow-GRPO `sde_step_with_logprob` ("sde" and "cps") and DanceGRPO's `flux_step` ("dance"), per-sample
    sigma [B]."""
    ct = compute_dtype(x, v)
    x, v = x.to(ct), v.to(ct)
    sigma = _per_sample(sigma, x)
    sigma_next = _per_sample(sigma_next, x)
    dt = sigma_next - sigma
    if sde_type in ("sde", "dance"):
        if sde_type == "sde":
            s = torch.where(sigma == 1, torch.full_like(sigma, sigma_max), sigma)
            std = torch.sqrt(sigma / (1 - s)) * noise_level
        else:  # DanceGRPO: mean = x + dt (v - eta^2 / 2 score), score = -(x - (1 - sigma) x0) / sigma^2: Flow-GRPO's
            std = torch.full_like(sigma, noise_level)  # step with std = eta
        mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
        scale = std * torch.sqrt(-dt)
        logp_fn = lambda prev, mu: _gaussian_logp(prev, mu, scale)
    else:  # "cps"
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        x0 = x - sigma * v
        x1 = x + (1 - sigma) * v
        mean = x0 * (1 - sigma_next) + x1 * torch.sqrt(sigma_next**2 - std**2)
        scale = std
        logp_fn = lambda prev, mu: (-((prev.detach() - mu) ** 2)).mean(dim=tuple(range(1, mu.ndim)))
    return _finish(mean, scale, std, noise, prev_sample, ref_mean, want_logp, logp_fn, out_dtype)


def ddim_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    alpha_t: torch.Tensor,
    alpha_prev: torch.Tensor,
    *,
    eta: float,
    prediction_type: str,
    clip_sample_range: float | None,
    use_clipped_model_output: bool,
    noise: torch.Tensor | None,
    prev_sample: torch.Tensor | None,
    ref_mean: torch.Tensor | None,
    want_logp: bool,
    out_dtype: torch.dtype,
):
    """DDPO `ddim_step_with_logprob` given the per-sample alphas_cumprod at t and at the previous t."""
    ct = compute_dtype(x, model_output)
    x, m = x.to(ct), model_output.to(ct)
    a_t = _per_sample(alpha_t, x)
    a_p = _per_sample(alpha_prev, x)
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        x0 = (x - b_t**0.5 * m) / a_t**0.5
        eps = m
    elif prediction_type == "sample":
        x0 = m
        eps = (x - a_t**0.5 * x0) / b_t**0.5
    else:  # "v_prediction"
        x0 = a_t**0.5 * x - b_t**0.5 * m
        eps = a_t**0.5 * m + b_t**0.5 * x
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    variance = (1 - a_p) / b_t * (1 - a_t / a_p)
    std = eta * variance**0.5
    if use_clipped_model_output:
        eps = (x - a_t**0.5 * x0) / b_t**0.5
    # DDPO's sqrt(1 - a_p - std^2) as sqrt((1 - a_p) (1 - eta^2 (1 - a_t / a_p) / b_t)): equal in exact arithmetic,
    # and exactly 0 at alpha_t = 0, eta = 1 (zero terminal SNR's first step), where the difference of two equal
    # terms left the square root of a rounding residual (~3e-4 in fp32) or NaN
    direction = ((1 - a_p) * (1 - eta**2 * (1 - a_t / a_p) / b_t)).clamp(min=0) ** 0.5
    mean = a_p**0.5 * x0 + direction * eps
    logp_fn = lambda prev, mu: _gaussian_logp(prev, mu, std)
    return _finish(mean, std, std, noise, prev_sample, ref_mean, want_logp, logp_fn, out_dtype)
