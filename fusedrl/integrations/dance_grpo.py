"""DanceGRPO drop-in: `flux_step` over the fused `fusedrl.kernels.flow_sde_step` (sde_type "dance").

    # before (DanceGRPO's fastvideo/train_grpo_flux.py, and MixGRPO's copy of it)
    z, x0, log_prob = flux_step(pred, z.float(), eta, sigmas, i, prev_sample=None, grpo=True, sde_solver=True)
    # after
    from fusedrl.integrations.dance_grpo import flux_step

DanceGRPO's step is Flow-GRPO's SDE step with a constant std (its `eta`): its score form
x + dsigma (v - eta^2 / 2 score), score = -(x - (1 - sigma) x0) / sigma^2, x0 = x - sigma v, expands to
Flow-GRPO's mean with std_dev_t = eta, and its noise scale eta sqrt(sigma - sigma_next) to Flow-GRPO's
std_dev_t sqrt(-dt). Same arguments and results as the original, in one fused pass.
"""

from __future__ import annotations

import math
import operator

import torch

from fusedrl.kernels import flow_sde_step

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def flux_step(
    model_output: torch.Tensor,
    latents: torch.Tensor,
    eta: float,
    sigmas: torch.Tensor,
    index: int,
    prev_sample: torch.Tensor | None,
    grpo: bool,
    sde_solver: bool,
):
    """One DanceGRPO step: DanceGRPO's `flux_step`, same arguments and results, on the fused kernel.

    Args:
        model_output: [B, ...] the velocity predicted by the model, any float dtype.
        latents: [B, ...] the current latent (DanceGRPO passes it in fp32).
        eta: the noise scale, > 0 (DanceGRPO's scripts: 0.3).
        sigmas: [S + 1] the sigma schedule (DanceGRPO: sd3_time_shift(shift, linspace(1, 0, S + 1))).
        index: the step, 0 <= index < S (an int or a 0-dim integer tensor): from sigmas[index] to sigmas[index + 1].
        prev_sample: [B, ...] a given next latent (its log-prob is computed; no noise is drawn), or None.
        grpo: True: sample (when prev_sample is None) and return the log-prob; False: the deterministic mean.
        sde_solver: must be True (the score-corrected mean DanceGRPO trains with); False, the Euler mean
            with SDE noise, is refused.

    Returns:
        grpo=True: (prev_sample [B, ...] fp32, pred_original_sample [B, ...], log_prob [B] fp32);
        grpo=False: (prev_sample_mean [B, ...] fp32, pred_original_sample [B, ...]).
        pred_original_sample = latents - sigma * model_output in their promoted dtype, as the original.
        log_prob = MEAN(-(prev - mean)^2 / (2 scale^2)), scale = eta sqrt(sigma - sigma_next): the original
        drops the Gaussian's constants (its `- log(std) - log sqrt(2 pi)` stands on a line of its own), and so
        does this; `fusedrl.kernels.flow_sde_step(..., sde_type="dance")` keeps them.
        New noise is drawn from torch's global generator in fp32, as the original's `torch.randn_like`.
    """
    if not sde_solver:
        raise ValueError("flux_step: sde_solver=False (the Euler mean with SDE noise) is not served by the fused "
                         "step; DanceGRPO trains with sde_solver=True")
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1:
        raise TypeError(f"sigmas must be a 1-D tensor (the schedule), got {type(sigmas).__name__}")
    try:  # an int, or a 0-dim integer tensor (DanceGRPO's training loop passes perms[i][j])
        step = operator.index(index) if not isinstance(index, bool) else None
    except TypeError:
        step = None
    if step is None or not 0 <= step < sigmas.shape[0] - 1:
        raise ValueError(f"index must be an int in [0, {sigmas.shape[0] - 2}] (sigmas has {sigmas.shape[0]} "
                         f"entries), got {index!r}")
    index = step
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0:
        raise ValueError(f"eta must be a float > 0, got {eta!r}")
    sigma, sigma_next = float(sigmas[index]), float(sigmas[index + 1])
    pred_original_sample = latents - sigma * model_output
    # v in fp32: new noise is then drawn in fp32, as the original's randn_like of its fp32 mean
    v = model_output.float()
    if not grpo:
        out = flow_sde_step(latents, v, sigma, sigma_next, noise_level=float(eta), sde_type="dance",
                            prev_sample=latents)
        return out.mean.float(), pred_original_sample
    given = None if prev_sample is None else prev_sample.float()
    out = flow_sde_step(latents, v, sigma, sigma_next, noise_level=float(eta), sde_type="dance", prev_sample=given)
    scale = float(eta) * math.sqrt(sigma - sigma_next)
    log_prob = out.logp + (math.log(scale) + _LOG_SQRT_2PI)
    return out.prev_sample.float(), pred_original_sample, log_prob
