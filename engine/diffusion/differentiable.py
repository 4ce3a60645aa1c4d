"""Differentiable sampling for reward backpropagation (AlignProp, DRaFT-K / DRaFT-LV, ReFL).

    gens = noise_generators(B, seed=step)
    x0 = initial_latents(policy, B, gens)                                   # [B, C, h, w] fp32
    lat = denoise(policy, emb, schedule, x0, grad_steps=K, guidance_scale=g, generators=gens,
                  checkpointing="full")                                     # last K steps carry gradients
    images = decode(policy, lat, checkpointing="full")                      # [B, 3, H, W] in [0, 1]
    loss = -reward(images, prompts).mean(); loss.backward()

What carries a gradient: the S denoising steps run in order; steps 0 .. S-K-1 run under `torch.no_grad`
(their latents are data), steps S-K .. S-1 run with grad, each one (denoiser call with CFG + the sampler
step) inside `fusedrl.engine.checkpointing.checkpoint(..., policy=checkpointing)`. A checkpointed step keeps
only its input latent [B, C, h, w] for backward and recomputes the denoiser's activations there, so the
memory of the K steps is flat in K (plus K latents); `checkpointing="none"` keeps every activation (linear
in K). The VAE decode is checkpointed the same way (`decode(..., checkpointing="full")`).

Steps: `noise_level == 0` (the default of DRaFT and AlignProp) gives the deterministic steps: the flow
Euler step x + (sigma_next - sigma) v (SD3 / Flux, FlowMatchEulerDiscreteScheduler.step) and DDIM with
eta = 0 (SD1.5; DDPO's formula, `fusedrl.kernels.ddim_step`). `noise_level > 0` gives the stochastic steps
of `fusedrl.kernels.flow_sde_step` (Flow-GRPO's SDE, `a` = noise_level) / `ddim_step` (eta = noise_level),
reparameterised: x_next = mean + scale * z with z drawn BEFORE the checkpointed region (so that the
recompute in backward sees the same z) from each sample's own generator, as `sampling.sample` draws it; the
gradient flows through the mean.

ReFL: `denoise(..., stop_at=i)` runs steps 0 .. i-1 without gradient and returns the one-step prediction of
x0 at step i (`predict_x0`), computed with gradient. DRaFT-LV: `renoise(policy, schedule, x0, step, noise)`
puts a final sample back at the noise level of `step`, for one more denoising step with gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from ..checkpointing import checkpoint
from .policy import DiffusionPolicy, PromptEmbeddings, Schedule
from .sampling import _ode_step, _step, stochastic_steps

__all__ = ["decode", "denoise", "initial_latents", "noise_generators", "predict_x0", "renoise", "step_noise"]


def noise_generators(batch: int, seed: int) -> list[torch.Generator]:
    """`batch` CPU generators, one per sample, seeded from `seed` (as `sampling.sample` seeds them)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    g = torch.Generator().manual_seed(int(seed))
    return [torch.Generator().manual_seed(s) for s in torch.randint(0, 2**62, (batch,), generator=g).tolist()]


def _randn(policy: DiffusionPolicy, shape: Sequence[int], generators: Sequence[torch.Generator]) -> torch.Tensor:
    # One draw per sample from its own generator, on the CPU (diffusers' randn_tensor with a generator list),
    # so that a sample's noise does not depend on the batch it is in.
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators]).to(policy.device)


def initial_latents(policy: DiffusionPolicy, batch: int, generators: Sequence[torch.Generator], *,
                    height: int | None = None, width: int | None = None) -> torch.Tensor:
    """The initial noise x_T: [batch, C, h, w] fp32 on policy.device (scaled by init_noise_sigma for DDIM)."""
    if len(generators) != batch:
        raise ValueError(f"generators has {len(generators)} entries for a batch of {batch}")
    h, w = policy.check_size(height or policy.defaults["height"], width or policy.defaults["width"])
    x = _randn(policy, (policy.latent_channels, h, w), generators)
    if not policy.is_flow:
        x = x * policy.scheduler.init_noise_sigma
    return x


def step_noise(policy: DiffusionPolicy, latents: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Noise z for one stochastic step, [B, C, h, w] fp32, one draw per sample from its generator."""
    return _randn(policy, latents.shape[1:], generators)


def _transition(policy: DiffusionPolicy, schedule: Schedule, i: int, x: torch.Tensor, out: torch.Tensor,
                noise_level: float, sde_type: str, z: torch.Tensor | None) -> torch.Tensor:
    """Step i from x with model output `out`: deterministic when noise_level == 0, else mean + scale * z."""
    if noise_level == 0:
        return _ode_step(policy, schedule, i, x.float(), out, sde_type)
    # prev_sample=x only makes the kernel return mean and std without drawing noise; its logp is unused.
    st = _step(policy, schedule, i, x.float(), out, noise_level=noise_level, sde_type=sde_type, prev_sample=x.float())
    scale = st.std.float()
    if policy.is_flow and sde_type in ("sde", "dance"):
        scale = scale * (float(schedule.sigmas[i]) - float(schedule.sigmas[i + 1])) ** 0.5
    return st.mean.float() + scale.view(-1, *([1] * (x.ndim - 1))) * z


def _step_fn(policy: DiffusionPolicy, schedule: Schedule, i: int, emb: PromptEmbeddings, guidance_scale: float,
             noise_level: float, sde_type: str, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    out = policy.predict(x, schedule.timesteps[i], emb, guidance_scale)
    return _transition(policy, schedule, i, x, out, noise_level, sde_type, z)


def predict_x0(policy: DiffusionPolicy, schedule: Schedule, i: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The one-step prediction of the clean latents from x at step i and the model output (ReFL), fp32.

    flow: x0 = x - sigma_i v. DDIM: by `scheduler.config.prediction_type` with a = alphas_cumprod at step i:
    epsilon: (x - sqrt(1 - a) eps) / sqrt(a); v_prediction: sqrt(a) x - sqrt(1 - a) v; sample: out.
    """
    x, out = x.float(), out.float()
    if policy.is_flow:
        return x - float(schedule.sigmas[i]) * out
    a = float(schedule.alphas_cumprod[i])
    kind = policy.scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (x - (1 - a) ** 0.5 * out) / a**0.5
    elif kind == "v_prediction":
        x0 = a**0.5 * x - (1 - a) ** 0.5 * out
    elif kind == "sample":
        x0 = out
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    cfg = policy.scheduler.config
    if cfg.get("clip_sample", False):
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    return x0


def _x0_fn(policy: DiffusionPolicy, schedule: Schedule, i: int, emb: PromptEmbeddings, guidance_scale: float,
           x: torch.Tensor) -> torch.Tensor:
    return predict_x0(policy, schedule, i, x, policy.predict(x, schedule.timesteps[i], emb, guidance_scale))


def renoise(policy: DiffusionPolicy, schedule: Schedule, x0: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
    """x0 put back at the noise level where step i starts (DRaFT-LV): flow (1 - sigma_i) x0 + sigma_i z;
    DDIM sqrt(a_i) x0 + sqrt(1 - a_i) z."""
    if policy.is_flow:
        s = float(schedule.sigmas[i])
        return (1 - s) * x0 + s * noise
    a = float(schedule.alphas_cumprod[i])
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def denoise(
    policy: DiffusionPolicy,
    embeddings: PromptEmbeddings,
    schedule: Schedule,
    latents: torch.Tensor,
    *,
    grad_steps: int,
    guidance_scale: float,
    generators: Sequence[torch.Generator] | None = None,
    noise_level: float = 0.0,
    sde_type: str = "sde",
    checkpointing: str = "full",
    start: int = 0,
    stop_at: int | None = None,
) -> torch.Tensor:
    """Run denoising steps start .. S-1 from `latents` (the latents at step `start`), gradients only through
    the last `grad_steps` of the S steps.

    Args:
        policy, embeddings [B, ...], schedule (S steps), latents [B, C, h, w].
        grad_steps: K, 0 <= K <= S: steps S-K .. S-1 run with grad, each checkpointed; earlier ones under
            no_grad. (Steps before `start` are not run.)
        guidance_scale: CFG weight (`DiffusionPolicy.predict`).
        generators: B per-sample generators for the step noise (needed when noise_level > 0).
        noise_level: 0 for deterministic steps, > 0 for stochastic ones (module docstring).
        sde_type: "sde", "cps" or "dance" (flow families, noise_level > 0).
        checkpointing: a `fusedrl.engine.checkpointing` policy for each gradient step ("none" keeps every
            activation).
        start: the index of the first step to run.
        stop_at: ReFL: run steps start .. stop_at-1 under no_grad, then return `predict_x0` at step stop_at
            computed with grad (checkpointed); grad_steps is then ignored.

    Returns:
        [B, C, h, w] fp32: the final latents (or the x0 prediction at `stop_at`).
    """
    S = len(schedule)
    if isinstance(grad_steps, bool) or not isinstance(grad_steps, int) or not 0 <= grad_steps <= S:
        raise ValueError(f"grad_steps must be an int in [0, num_steps = {S}], got {grad_steps!r}")
    if not 0 <= start <= S:
        raise ValueError(f"start must lie in [0, {S}], got {start!r}")
    if stop_at is not None and not start <= stop_at < S:
        raise ValueError(f"stop_at must lie in [start = {start}, num_steps - 1 = {S - 1}], got {stop_at!r}")
    if noise_level > 0 and generators is None:
        raise ValueError("noise_level > 0 needs generators (one per sample) for the step noise")
    end = S if stop_at is None else stop_at
    first_grad = S - grad_steps if stop_at is None else S
    # steps with no noise ("linspace" DDIM's t = 0 into itself) run as ODE steps
    noisy = stochastic_steps(schedule, sde_type if policy.is_flow else "ddim").tolist()
    x = latents.float()
    for i in range(start, end):
        z = step_noise(policy, x, generators) if noise_level > 0 else None
        level = noise_level if noisy[i] else 0.0
        if i < first_grad or not torch.is_grad_enabled():
            with torch.no_grad():
                x = _step_fn(policy, schedule, i, embeddings, guidance_scale, level, sde_type, x, z)
        else:
            # functools.partial binds i now: the recompute in backward runs after the loop has moved on.
            fn = functools.partial(_step_fn, policy, schedule, i, embeddings, guidance_scale, level, sde_type)
            x = checkpoint(fn, x, z, policy=checkpointing)
    if stop_at is not None:
        fn = functools.partial(_x0_fn, policy, schedule, stop_at, embeddings, guidance_scale)
        x = checkpoint(fn, x, policy=checkpointing)
    return x


def decode(policy: DiffusionPolicy, latents: torch.Tensor, *, checkpointing: str = "full",
           micro_batch: int | None = None) -> torch.Tensor:
    """VAE decode [B, C, h, w] -> images [B, 3, H, W] fp32 in [0, 1], checkpointed (`checkpointing` policy;
    "none": keep the decoder's activations), `micro_batch` latents per decoder call (default all)."""
    mb = latents.shape[0] if micro_batch is None else micro_batch
    parts = [checkpoint(policy.decode, latents[s:s + mb], policy=checkpointing) for s in range(0, latents.shape[0], mb)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]
