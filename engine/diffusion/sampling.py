"""Sampling with log-probabilities, and their recomputation under the current policy (GRPO).

    traj = sample(policy, prompts, group_size=8, num_steps=10, guidance_scale=4.5, sde_window=(0, 4), seed=step)
    rewards = reward_fn(traj.images, traj.prompts)                     # [B]
    adv = group_advantages(rewards, traj.group_ids)                    # [B]
    for idx in traj.micro_batches():                                   # the sampling's micro-batches
        for s in traj.sde_steps.tolist():                              # or a random subset of them
            out = recompute_logprobs(policy, traj, [s], sample_indices=idx, with_reference=beta > 0)
            ratio = torch.exp(out.log_probs - traj.log_probs_at([s])[idx])      # [b, 1], == 1 on policy
            loss = ppo_clip_loss(ratio, adv[idx]) + beta * out.kl.mean()
            loss.backward()

Step conventions (DESIGN.md, "Flow-matching SDE step" and "DDIM step with log-prob"):
- flow families: step i goes from sigmas[i] to sigmas[i + 1] with `fusedrl.kernels.flow_sde_step`
  (Flow-GRPO's `sde_step_with_logprob`, `noise_level` = its `a`, sde_type "sde" or "cps"; or DanceGRPO's
  `flux_step`, sde_type "dance", `noise_level` = its `eta`);
- DDIM family: `fusedrl.kernels.ddim_step` with eta = `noise_level` (DDPO), alphas_cumprod at t and at
  prev_t = max(t - T // S, 0);
- log-probs are MEANS over the latent elements of the Gaussian log-density, fp32, per sample [B].
Steps outside `sde_window` are ODE steps: the same kernels with noise_level / eta = 0 (the deterministic
flow Euler step / DDIM eta = 0 step), no noise drawn and no log-prob. MixGRPO / Flow-GRPO-Fast /
DanceGRPO train only the SDE steps.

Randomness: every sample has its own CPU generator, seeded from `seed` (or drawn from `generator`, or given
per sample in `seeds`), which draws its initial noise and then its step noise, as diffusers' `randn_tensor`
does. A sample's noise
therefore does not depend on the batch it is in, and the same seed gives a bit-identical trajectory on the
CPU (on a GPU, up to the kernels' determinism).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fusedrl.kernels import ddim_step, flow_sde_step
from fusedrl.kernels.diffusion_step.api import StepOutput

from .policy import DiffusionPolicy, PromptEmbeddings, Schedule

__all__ = ["LogProbs", "Trajectory", "recompute_logprobs", "sample"]

SDE_TYPES = ("sde", "cps", "dance")
# noise_level when none is given: Flow-GRPO's a = 0.7, CPS's 0.7 likewise, DanceGRPO's scripts' eta = 0.3; DDIM eta 1
DEFAULT_NOISE_LEVELS = {"sde": 0.7, "cps": 0.7, "dance": 0.3, "ddim": 1.0}


@dataclass
class Trajectory:
    """What `sample` returns: B = len(prompts) * group_size samples of S steps, K of them SDE steps.

    prompts: B strings, each input prompt repeated group_size times (consecutively).
    group_ids: [B] int64, the index of each sample's prompt in the input list.
    embeddings: PromptEmbeddings [B, ...] (conditional; detached) used at sampling.
    latents: [B, S + 1, C, h, w] fp32: latents[:, 0] the initial noise, latents[:, i + 1] the result of
        step i, latents[:, S] the final latents.
    schedule: Schedule (timesteps [S]; sigmas [S + 1], or alphas_cumprod and alphas_cumprod_prev [S]).
    sde_steps: [K] int64, ascending, the steps sampled with noise (and a log-prob).
    log_probs: [B, K] fp32, log p(latents[:, s + 1] | latents[:, s]) for s in sde_steps.
    images: [B, 3, H, W] fp32 in [0, 1], or None (decode=False).
    guidance_scale, noise_level, sde_type: as sampled (recompute_logprobs reuses them).
    micro_batch_size: the denoiser's batch (before CFG doubling) at sampling; `micro_batches()` lists them.
    """

    prompts: list[str]
    group_ids: torch.Tensor
    embeddings: PromptEmbeddings
    latents: torch.Tensor
    schedule: Schedule
    sde_steps: torch.Tensor
    log_probs: torch.Tensor
    images: torch.Tensor | None
    guidance_scale: float
    noise_level: float
    sde_type: str
    micro_batch_size: int
    family: str

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return len(self.schedule)

    def micro_batches(self) -> list[torch.Tensor]:
        """The [b] int64 index tensors of the micro-batches the sampler ran; recomputing with the same ones
        repeats its numerics exactly (the on-policy ratio is then exactly 1 in fp32 on the CPU)."""
        n, m = len(self), self.micro_batch_size
        return [torch.arange(i, min(i + m, n)) for i in range(0, n, m)]

    def log_probs_at(self, step_indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """[B, k] the recorded log-probs of steps `step_indices` (each must be an SDE step)."""
        cols = _columns(self, step_indices)
        return self.log_probs[:, cols]


@dataclass
class LogProbs:
    """What `recompute_logprobs` returns for b samples and k steps.

    log_probs: [b, k] fp32 under the current policy, differentiable w.r.t. its trainable parameters.
    ref_log_probs: [b, k] fp32 under the reference policy (no grad), or None.
    kl: [b, k] fp32 MEAN((mean - ref_mean)^2) / (2 std^2) per step (Flow-GRPO's KL; differentiable), or None.
    """

    log_probs: torch.Tensor
    ref_log_probs: torch.Tensor | None = None
    kl: torch.Tensor | None = None


# ----------------------------------------------------------------------------- the step


def _step(policy: DiffusionPolicy, schedule: Schedule, i: int, x: torch.Tensor, out: torch.Tensor, *,
          noise_level: float, sde_type: str, prev_sample: torch.Tensor | None = None,
          generator: list[torch.Generator] | None = None, ref_mean: torch.Tensor | None = None) -> StepOutput:
    """Transition i: x = latents at step i [b, C, h, w] fp32, out = policy.predict(...) fp32."""
    if policy.is_flow:
        sigmas = schedule.sigmas
        sigma_max = float(sigmas[1]) if (sde_type == "sde" and len(sigmas) > 1) else None
        return flow_sde_step(x, out, float(sigmas[i]), float(sigmas[i + 1]), noise_level=noise_level, sde_type=sde_type,
                             prev_sample=prev_sample, generator=generator, sigma_max=sigma_max, ref_mean=ref_mean)
    cfg = policy.scheduler.config
    return ddim_step(out, x, float(schedule.alphas_cumprod[i]), float(schedule.alphas_cumprod_prev[i]),
                     eta=noise_level, prediction_type=cfg.prediction_type,
                     clip_sample_range=cfg.clip_sample_range if cfg.clip_sample else None, prev_sample=prev_sample,
                     generator=generator, ref_mean=ref_mean)


def _ode_step(policy: DiffusionPolicy, schedule: Schedule, i: int, x: torch.Tensor, out: torch.Tensor, sde_type: str):
    """The deterministic step i (noise 0): what the SDE step's mean becomes at noise_level / eta = 0."""
    if policy.is_flow:
        # The Euler step, as FlowMatchEulerDiscreteScheduler.step computes it (fp32); both "sde" and "cps"
        # reduce to it at noise_level 0.
        dt = float(schedule.sigmas[i + 1]) - float(schedule.sigmas[i])
        return x.float() + dt * out.float()
    # DDIM eta = 0: with a given prev_sample the kernel draws no noise; its `mean` is the step.
    return _step(policy, schedule, i, x, out, noise_level=0.0, sde_type=sde_type, prev_sample=x).mean.float()


# ----------------------------------------------------------------------------- validation


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def stochastic_steps(schedule, kind: str) -> torch.Tensor:
    """[S] bool: the steps whose transition has noise. A CPS step into sigma = 0 (the last flow step) and a DDIM
    step into alphas_cumprod = 1 (or into its own: t = 0) are deterministic (std 0): they run as ODE steps, with no
    log-prob, and are never trained (Flow-GRPO's timestep_fraction 0.99 leaves CPS's last step out for the same
    reason: its KL term divides by std^2 = 0; their CPS log-prob has no sampling behind it)."""
    if kind == "cps":
        return schedule.sigmas[1:] > 0
    if kind == "ddim":
        # a step into alphas_cumprod 1, or to its own alphas_cumprod ("linspace" spacing's last step, t = 0 to
        # prev_t = 0): std 0
        return (schedule.alphas_cumprod_prev < 1) & (schedule.alphas_cumprod_prev > schedule.alphas_cumprod)
    return torch.ones(len(schedule), dtype=torch.bool)


def _sde_mask(num_steps: int, sde_window) -> torch.Tensor:
    mask = torch.zeros(num_steps, dtype=torch.bool)
    if sde_window is None:
        mask[:] = True
        return mask
    if (not isinstance(sde_window, (tuple, list)) or len(sde_window) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in sde_window)):
        raise TypeError(f"sde_window must be a (start, end) pair of ints or None, got {sde_window!r}")
    start, end = sde_window
    if not 0 <= start < end <= num_steps:
        raise ValueError(f"sde_window must satisfy 0 <= start < end <= num_steps = {num_steps}, got {sde_window!r}")
    mask[start:end] = True
    return mask


def _columns(traj: Trajectory, step_indices) -> list[int]:
    steps = torch.as_tensor(step_indices, dtype=torch.long).reshape(-1).tolist()
    if not steps:
        raise ValueError("step_indices is empty")
    where = {s: k for k, s in enumerate(traj.sde_steps.tolist())}
    bad = [s for s in steps if s not in where]
    if bad:
        raise ValueError(f"step_indices {bad} are not SDE steps of this trajectory (SDE steps: "
                         f"{traj.sde_steps.tolist()}; ODE steps have no log-prob)")
    return [where[s] for s in steps]


def _int_list(name: str, values, n: int) -> list[int]:
    values = list(values)
    if len(values) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be {n} ints (one per sample), got {len(values)} values")
    return values


def _generators(batch: int, seed: int | None, generator: torch.Generator | None,
                seeds: Sequence[int] | None = None) -> list[torch.Generator]:
    if sum(x is not None for x in (seed, generator, seeds)) > 1:
        raise ValueError("pass one of seed, generator and seeds")
    if seeds is not None:
        return [torch.Generator().manual_seed(s) for s in _int_list("seeds", seeds, batch)]
    if generator is None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        generator = torch.Generator().manual_seed(seed)
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    seeds = torch.randint(0, 2**62, (batch,), generator=generator, device=generator.device).tolist()
    return [torch.Generator().manual_seed(s) for s in seeds]


# ----------------------------------------------------------------------------- sample


@torch.no_grad()
def sample(
    policy: DiffusionPolicy,
    prompts: Sequence[str],
    *,
    group_size: int = 1,
    num_steps: int = 10,
    guidance_scale: float | None = None,
    noise_level: float | None = None,
    sde_window: tuple[int, int] | None = None,
    sde_type: str = "sde",
    seed: int | None = None,
    generator: torch.Generator | None = None,
    seeds: Sequence[int] | None = None,
    initial_noise_seeds: Sequence[int] | None = None,
    height: int | None = None,
    width: int | None = None,
    max_batch_size: int | None = None,
    decode: bool = True,
    same_initial_noise_per_group: bool = False,
) -> Trajectory:
    """Sample `group_size` images per prompt, recording latents and the log-prob of every SDE step.

    Args:
        policy: a DiffusionPolicy.
        prompts: P prompts; the batch is B = P * group_size, prompt j's samples at rows j*G .. j*G + G - 1.
        num_steps: S denoising steps (1 and up: few-step samplers work the same way).
        guidance_scale: CFG weight (default: policy.defaults["guidance_scale"]); > 1 runs CFG as one batched
            call per step (see `DiffusionPolicy.predict`).
        noise_level: flow: Flow-GRPO's `a` (default 0.7) or, under "dance", DanceGRPO's eta (default 0.3);
            DDIM: eta (default 1.0, DDPO). Must be > 0.
        sde_window: (start, end): SDE steps are start <= i < end, ODE steps elsewhere; None: every step is SDE.
        sde_type: flow families: "sde" (Flow-GRPO), "cps" (coefficients-preserving) or "dance" (DanceGRPO's
            step: Flow-GRPO's with a constant std); ignored for DDIM.
        seed / generator: the randomness (one of them; neither: a random seed). See the module docstring.
        seeds: instead, B ints: sample b's own generator is seeded with seeds[b]. A trainer that spreads one
            batch over processes or micro-batches passes seeds that are a function of each sample's place in
            the whole batch, so the samples do not depend on how the batch is split.
        initial_noise_seeds: B ints: sample b's initial noise is drawn by a fresh generator seeded with
            initial_noise_seeds[b] (its own generator then draws only its step noise). Equal values for the
            samples of a group give them one starting point (DanceGRPO) even when the group is split.
        height, width: image size in px (default: policy.defaults).
        max_batch_size: samples per denoiser call (before CFG doubling); default: all B at once.
        decode: decode the final latents to images with the VAE.
        same_initial_noise_per_group: all samples of a group start from the same noise (DanceGRPO);
            they still draw their own step noise.

    Returns:
        Trajectory (on policy.device). Runs under torch.no_grad.
    """
    if not isinstance(policy, DiffusionPolicy):
        raise TypeError(f"policy must be a DiffusionPolicy, got {type(policy).__name__}")
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings")
    G = _check_int("group_size", group_size, 1)
    S = _check_int("num_steps", num_steps, 1)
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
    if not policy.is_flow:
        sde_type = "sde"  # DDIM has one kind of stochastic step
    g = float(policy.defaults["guidance_scale"] if guidance_scale is None else guidance_scale)
    if noise_level is None:
        noise_level = DEFAULT_NOISE_LEVELS[sde_type if policy.is_flow else "ddim"]
    if isinstance(noise_level, bool) or not isinstance(noise_level, (int, float)) or not noise_level > 0:
        raise ValueError(f"noise_level must be a float > 0 (the ODE steps outside sde_window use 0), "
                         f"got {noise_level!r}")
    noise_level = float(noise_level)
    height = height or policy.defaults["height"]
    width = width or policy.defaults["width"]
    h, w = policy.check_size(height, width)
    mask = _sde_mask(S, sde_window)

    prompts = list(prompts)
    B = len(prompts) * G
    mb = B if max_batch_size is None else _check_int("max_batch_size", max_batch_size, 1)
    expanded = [p for p in prompts for _ in range(G)]
    group_ids = torch.arange(len(prompts)).repeat_interleave(G)
    embeddings = policy.encode_prompts(prompts).index(group_ids.to(policy.device)).detach()
    schedule = policy.schedule(S, height, width)
    mask &= stochastic_steps(schedule, sde_type if policy.is_flow else "ddim")
    if not mask.any():
        raise ValueError(f"sde_window {sde_window} holds only deterministic steps (a CPS step into sigma = 0 has no "
                         "noise): no step would have a log-prob; widen it or move it earlier")
    gens = _generators(B, seed, generator, seeds)

    C = policy.latent_channels
    device = policy.device
    if initial_noise_seeds is not None:
        if same_initial_noise_per_group:
            raise ValueError("pass same_initial_noise_per_group or initial_noise_seeds, not both")
        init = _int_list("initial_noise_seeds", initial_noise_seeds, B)
        x0 = torch.cat([torch.randn((1, C, h, w), generator=torch.Generator().manual_seed(s)) for s in init])
    elif same_initial_noise_per_group:
        first = [gens[j * G] for j in range(len(prompts))]
        x0 = torch.cat([torch.randn((1, C, h, w), generator=gen) for gen in first]).repeat_interleave(G, dim=0)
    else:
        x0 = torch.cat([torch.randn((1, C, h, w), generator=gen) for gen in gens])
    if not policy.is_flow:
        x0 = x0 * policy.scheduler.init_noise_sigma
    latents = torch.empty((B, S + 1, C, h, w), dtype=torch.float32, device=device)
    latents[:, 0] = x0.to(device)
    sde_steps = mask.nonzero().reshape(-1)
    log_probs = torch.empty((B, len(sde_steps)), dtype=torch.float32, device=device)

    for start in range(0, B, mb):
        idx = slice(start, min(start + mb, B))
        emb = embeddings.index(idx)
        x = latents[idx, 0]
        k = 0
        for i in range(S):
            out = policy.predict(x, schedule.timesteps[i], emb, g)
            if mask[i]:
                step = _step(policy, schedule, i, x, out, noise_level=noise_level, sde_type=sde_type,
                             generator=gens[idx])
                x = step.prev_sample.float()
                log_probs[idx, k] = step.logp
                k += 1
            else:
                x = _ode_step(policy, schedule, i, x, out, sde_type)
            latents[idx, i + 1] = x

    images = None
    if decode:
        images = torch.cat([policy.decode(latents[s:s + mb, S]) for s in range(0, B, mb)])
    return Trajectory(
        prompts=expanded, group_ids=group_ids, embeddings=embeddings, latents=latents, schedule=schedule,
        sde_steps=sde_steps, log_probs=log_probs, images=images, guidance_scale=g, noise_level=noise_level,
        sde_type=sde_type, micro_batch_size=mb, family=policy.family,
    )


# ----------------------------------------------------------------------------- recompute


def recompute_logprobs(
    policy: DiffusionPolicy,
    trajectory: Trajectory,
    step_indices: Sequence[int] | torch.Tensor,
    *,
    sample_indices: Sequence[int] | torch.Tensor | slice | None = None,
    with_reference: bool = False,
) -> LogProbs:
    """Log-probs of the recorded transitions latents[:, s] -> latents[:, s + 1] under the current policy.

    What the GRPO trainer calls in training: runs with grad (when enabled), so `log_probs` back-propagates
    into the policy's trainable parameters. Uses the sampling's guidance_scale, noise_level and sde_type.

    Args:
        policy: the policy being trained (the one that sampled `trajectory`, possibly updated since).
        trajectory: from `sample`.
        step_indices: k step indices (values of trajectory.sde_steps); ODE steps raise ValueError.
        sample_indices: the b samples to recompute (default: all B in one batch). Pass the sampler's
            micro-batches (`trajectory.micro_batches()`) to repeat its numerics exactly.
        with_reference: also compute the reference policy's log-probs (adapter disabled / frozen copy,
            no grad) and the KL of the current step distribution to it.

    Returns:
        LogProbs(log_probs [b, k], ref_log_probs [b, k] or None, kl [b, k] or None).
    """
    if not isinstance(trajectory, Trajectory):
        raise TypeError(f"trajectory must be a Trajectory (from sample), got {type(trajectory).__name__}")
    _columns(trajectory, step_indices)  # validates
    steps = torch.as_tensor(step_indices, dtype=torch.long).reshape(-1).tolist()
    if sample_indices is None:
        idx: torch.Tensor | slice = slice(None)
    elif isinstance(sample_indices, slice):
        idx = sample_indices
    else:
        idx = torch.as_tensor(sample_indices, dtype=torch.long).reshape(-1)
        if idx.numel() == 0 or idx.min() < 0 or idx.max() >= len(trajectory):
            raise ValueError(f"sample_indices must be non-empty and lie in [0, {len(trajectory) - 1}]")
        idx = idx.to(trajectory.latents.device)
    latents = trajectory.latents[idx]
    prompts = [trajectory.prompts[i] for i in torch.arange(len(trajectory))[idx.cpu() if isinstance(idx, torch.Tensor)
                                                                            else idx].tolist()]

    def embeddings() -> PromptEmbeddings:
        # Frozen text encoders: the recorded embeddings; trainable ones: encode again (with grad).
        if policy.text_encoder_trainable:
            return policy.encode_prompts(prompts)
        return trajectory.embeddings.index(idx)

    kw = dict(noise_level=trajectory.noise_level, sde_type=trajectory.sde_type)
    g = trajectory.guidance_scale
    emb = embeddings()
    ref_emb = None
    lps, ref_lps, kls = [], [], []
    for s in steps:
        x, x_next, t = latents[:, s], latents[:, s + 1], trajectory.schedule.timesteps[s]
        ref_mean = None
        if with_reference:
            with torch.no_grad(), policy.reference():
                if ref_emb is None:
                    ref_emb = embeddings()
                v_ref = policy.predict(x, t, ref_emb, g)
                ref = _step(policy, trajectory.schedule, s, x, v_ref, prev_sample=x_next, **kw)
            ref_lps.append(ref.logp)
            ref_mean = ref.mean
        out = _step(policy, trajectory.schedule, s, x, policy.predict(x, t, emb, g), prev_sample=x_next,
                    ref_mean=ref_mean, **kw)
        lps.append(out.logp)
        if with_reference:
            kls.append(out.kl)
    stack = lambda xs: torch.stack(xs, dim=1) if xs else None
    return LogProbs(stack(lps), stack(ref_lps), stack(kls))
