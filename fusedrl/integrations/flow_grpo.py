"""Flow-GRPO drop-in: `sde_step_with_logprob` over the fused `fusedrl.kernels.flow_sde_step`.

    # before
    from flow_grpo.diffusers_patch.sd3_sde_with_logprob import sde_step_with_logprob
    # after
    from fusedrl.integrations.flow_grpo import sde_step_with_logprob

Same signature, same results (DESIGN.md, "Flow-matching SDE step"): the fused op computes the
transition mean, the sampled latent and the log-probability in one pass, in fp32, and its backward
recomputes instead of keeping the elementwise intermediates of the torch formula alive.
"""

from __future__ import annotations

import torch

from fusedrl.kernels import flow_sde_step

# The fused kernels read these dtypes and upcast on load (exactly), so a half-precision sample needs
# no fp32 copy; anything else (fp64) is cast to fp32, as the original's `.float()` does.
_LOADED_AS_IS = (torch.float16, torch.bfloat16, torch.float32)


def _timestep_tensor(timestep, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A [B] / [1] / 0-dim tensor, a list of numbers or of 0-dim tensors, or a number -> [B] `dtype` tensor.

    The original compares each timestep with `scheduler.timesteps` by `==`, which computes in the
    schedule's dtype (a 0-dim tensor or a Python number takes the dimensioned operand's dtype), so
    the timesteps are cast to that dtype before the comparison here too.
    """
    if isinstance(timestep, (list, tuple)):
        if len(timestep) == 0:
            raise ValueError("timestep: an empty list")
        t = torch.stack([torch.as_tensor(s, device=device).reshape(()).to(dtype) for s in timestep])
    else:
        t = torch.as_tensor(timestep, device=device).to(dtype)
    if t.ndim > 1 or t.numel() not in (1, batch):
        raise ValueError(f"timestep must have shape [B] = [{batch}] (or be one value), got {tuple(t.shape)}")
    return t.reshape(-1).expand(batch)


def _step_indices(schedule: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[B] index of each t in `schedule` [N] by diffusers' `index_for_timestep` rule; -1 where absent.

    That rule takes the second match when a timestep occurs more than once (so that a schedule that
    starts mid-way, as in image-to-image, does not skip a sigma), else the only one.
    """
    matches = t[:, None] == schedule[None, :]  # [B, N]
    count = matches.sum(dim=1)
    wanted = torch.where(count > 1, 2, 1)
    hit = matches & (matches.cumsum(dim=1) == wanted[:, None])
    index = hit.to(torch.uint8).argmax(dim=1)  # the first (only) True per row
    return torch.where(count > 0, index, -1)


def _schedule_values(scheduler, timestep, batch: int, device: torch.device):
    """-> (sigma [B], sigma_next [B], sigma_max): scheduler.sigmas at each timestep's index and the
    next one, on `device` (the scheduler's tensors may live elsewhere, e.g. on the CPU), and sigmas[1]."""
    for name in ("timesteps", "sigmas"):
        if not isinstance(getattr(scheduler, name, None), torch.Tensor):
            raise TypeError(f"scheduler must be a flow-matching scheduler with a `{name}` tensor "
                            f"(e.g. FlowMatchEulerDiscreteScheduler), got {type(scheduler).__name__}")
    schedule = scheduler.timesteps.to(device)
    sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)
    t = _timestep_tensor(timestep, batch, device, schedule.dtype)
    index = _step_indices(schedule, t)
    # One host read for both the check and sigma_max (the original syncs once per sample).
    missing, sigma_max = torch.stack([(index < 0).any().to(sigmas.dtype), sigmas[1]]).tolist()
    if missing:
        absent = sorted(set(t[index < 0].tolist()))
        raise ValueError(f"timestep {absent} is not in scheduler.timesteps {scheduler.timesteps.tolist()}")
    return sigmas[index], sigmas[index + 1], sigma_max


def sde_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    sde_type: str = "sde",
):
    """One Flow-GRPO SDE ("sde") or CPS ("cps") step with its log-probability: Flow-GRPO's
    `sde_step_with_logprob`, same arguments and results, on the fused kernel.

    Args:
        scheduler: a `FlowMatchEulerDiscreteScheduler` (any scheduler with `timesteps` [N] and
            `sigmas` [N + 1] tensors, on any device) after `set_timesteps`.
        model_output: [B, ...] the velocity predicted by the model, any float dtype.
        timestep: [B] tensor (or a list) of values of `scheduler.timesteps`, one per sample, possibly
            different; one value (0-dim tensor or number) serves the whole batch. Each is looked up
            like `scheduler.index_for_timestep` (the second occurrence where a value repeats).
        sample: [B, ...] the current latent x_t.
        noise_level: Flow-GRPO's `a`; 0 makes the step deterministic.
        prev_sample: [B, ...] a given next latent (its log-prob is computed; no noise is drawn).
        generator: torch.Generator or a list of B, noise drawn like diffusers' `randn_tensor` in fp32,
            so a seeded call gives the original's sample.
        sde_type: "sde" or "cps".

    Returns:
        (prev_sample [B, ...] fp32, log_prob [B] fp32, prev_sample_mean [B, ...] fp32,
        std_dev_t [B, 1, ..., 1] fp32). A given prev_sample comes back as `prev_sample.float()`.
        log_prob is None for "sde" with noise_level = 0, where the original's is NaN (0 / 0).

    Equivalent PyTorch ("sde"), per sample, with sigma = sigmas[i], sigma_next = sigmas[i + 1],
    dt = sigma_next - sigma, s = sigmas[1] if sigma == 1 else sigma:
        std_dev_t = noise_level * sqrt(sigma / (1 - s))
        mean = x * (1 + std_dev_t**2 / (2 sigma) * dt) + v * (1 + std_dev_t**2 (1 - sigma) / (2 sigma)) * dt
        prev_sample = mean + std_dev_t * sqrt(-dt) * z
        log_prob = Normal(mean, std_dev_t * sqrt(-dt)).log_prob(prev_sample.detach()).mean(dims 1..)
    """
    if sde_type not in ("sde", "cps"):
        raise ValueError(f"sde_type must be 'sde' or 'cps', got {sde_type!r}")
    if not isinstance(sample, torch.Tensor) or sample.ndim < 1:
        raise TypeError(f"sample must be a tensor of shape [B, ...], got {type(sample).__name__}")
    # v in fp32 because the noise is drawn in model_output's dtype after the original's `.float()`.
    v = model_output.float()
    x = sample if sample.dtype in _LOADED_AS_IS else sample.float()
    given = None if prev_sample is None else prev_sample.float()
    sigma, sigma_next, sigma_max = _schedule_values(scheduler, timestep, sample.shape[0], sample.device)
    out = flow_sde_step(
        x, v, sigma, sigma_next, noise_level=noise_level, sde_type=sde_type, prev_sample=given,
        generator=generator, sigma_max=sigma_max if sde_type == "sde" else None,
    )
    std_dev_t = out.std.reshape((-1,) + (1,) * (sample.ndim - 1))
    return out.prev_sample, out.logp, out.mean, std_dev_t
