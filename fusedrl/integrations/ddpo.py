"""DDPO drop-in: `ddim_step_with_logprob` over the fused `fusedrl.kernels.ddim_step`.

    # before
    from ddpo_pytorch.diffusers_patch.ddim_with_logprob import ddim_step_with_logprob
    # after
    from fusedrl.integrations.ddpo import ddim_step_with_logprob

Same arguments in the same order, same results (DESIGN.md, "DDIM step with log-prob"), except that
a deterministic step (eta = 0) returns log_prob None where the original returns NaN.
"""

from __future__ import annotations

import torch

from fusedrl.kernels import ddim_step


def _check_scheduler(scheduler) -> None:
    from diffusers import DDIMScheduler  # here, so that importing this module does not import diffusers

    if not isinstance(scheduler, DDIMScheduler):
        raise TypeError(f"scheduler must be a diffusers DDIMScheduler, got {type(scheduler).__name__}")
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler.num_inference_steps is None: call scheduler.set_timesteps(...) first")
    if scheduler.config.thresholding:
        raise ValueError("scheduler.config.thresholding=True is not supported: dynamic thresholding clamps x0 "
                         "by a per-sample quantile, which the fused step does not compute; use clip_sample")


def _timestep_indices(timestep, batch: int, num_train_timesteps: int) -> torch.Tensor:
    """An int, a 0-dim or a [B] integer tensor -> [B] int64 CPU tensor, checked to lie in [0, T - 1].

    The values are read on the host (one sync for a GPU tensor, as the original's `.cpu()`), which
    lets the alphas be gathered without an out-of-bounds index reaching a device.
    """
    if isinstance(timestep, bool) or not isinstance(timestep, (int, torch.Tensor)):
        raise TypeError(f"timestep must be an int or an integer tensor, got {type(timestep).__name__}")
    t = torch.as_tensor(timestep).detach().cpu()
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"timestep must be an integer tensor (scheduler.timesteps), got {t.dtype}")
    if t.ndim > 1 or t.numel() not in (1, batch):
        raise ValueError(f"timestep must be one value or have shape [B] = [{batch}], got {tuple(t.shape)}")
    t = t.reshape(-1).expand(batch).long()
    bad = (t < 0) | (t >= num_train_timesteps)
    if bad.any():
        raise ValueError(f"timestep {t[bad].tolist()} is outside [0, {num_train_timesteps - 1}] "
                         "(config.num_train_timesteps)")
    return t


def _gather(alphas_cumprod: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """alphas_cumprod[index] -> [B]; kept on the CPU when the table is there (the fused op moves it and
    checks its values on the host for free), else moved to the sample's device."""
    values = alphas_cumprod[index.to(alphas_cumprod.device)]
    return values if values.device.type == "cpu" else values.to(device)


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
    generator: torch.Generator | list[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
):
    """One DDIM step with the log-probability of its result: DDPO's `ddim_step_with_logprob`, same
    arguments (in the same order) and results, on the fused kernel.

    Args:
        scheduler: a diffusers `DDIMScheduler` after `set_timesteps`; its config gives
            prediction_type ("epsilon", "sample", "v_prediction"), clip_sample and clip_sample_range.
            thresholding=True is refused (ValueError).
        model_output: [B, ...] the denoiser's output (fp32/fp16/bf16; the math runs in fp32).
        timestep: int, 0-dim or [B] integer tensor of timesteps in [0, num_train_timesteps - 1],
            possibly different per sample.
        sample: [B, ...] the current latent x_t.
        eta: noise weight; 0 is deterministic.
        use_clipped_model_output: re-derive eps from the clipped x0.
        generator: torch.Generator or a list of B; noise is drawn like diffusers' `randn_tensor` in
            model_output's dtype, so a seeded call gives the original's sample.
        prev_sample: [B, ...] a given x_{t-1} (its log-prob is computed; no noise is drawn).

    Returns:
        (prev_sample [B, ...] in sample.dtype, log_prob [B] fp32). log_prob is None when eta = 0
        (the step is deterministic and prev_sample is the mean), where the original returns NaN.

    Equivalent PyTorch (epsilon prediction), per sample, with T = config.num_train_timesteps,
    prev_t = clamp(t - T // num_inference_steps, 0, T - 1) (DDPO clamps: the last step uses
    alphas_cumprod[0], not final_alpha_cumprod), a_t = alphas_cumprod[t], a_p = alphas_cumprod[prev_t]:
        x0 = (x - sqrt(1 - a_t) * eps) / sqrt(a_t)           # clamped to +-clip_sample_range if clip_sample
        std = eta * sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        mean = sqrt(a_p) * x0 + sqrt(1 - a_p - std**2) * eps
        prev_sample = mean + std * z
        log_prob = Normal(mean, std).log_prob(prev_sample.detach()).mean(dims 1..)
    """
    _check_scheduler(scheduler)
    if not isinstance(sample, torch.Tensor) or sample.ndim < 1:
        raise TypeError(f"sample must be a tensor of shape [B, ...], got {type(sample).__name__}")
    config = scheduler.config
    T = config.num_train_timesteps
    t = _timestep_indices(timestep, sample.shape[0], T)
    prev_t = (t - T // scheduler.num_inference_steps).clamp(0, T - 1)
    out = ddim_step(
        model_output, sample,
        _gather(scheduler.alphas_cumprod, t, sample.device), _gather(scheduler.alphas_cumprod, prev_t, sample.device),
        eta=eta, prediction_type=config.prediction_type,
        clip_sample_range=config.clip_sample_range if config.clip_sample else None,
        use_clipped_model_output=use_clipped_model_output, prev_sample=prev_sample, generator=generator,
    )
    return out.prev_sample.to(sample.dtype), out.logp
