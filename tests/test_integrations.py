"""Parity of the drop-ins in fusedrl.integrations with the trainers' own step functions, on diffusers'
real schedulers (a FlowMatchEulerDiscreteScheduler set up like SD3's, DDIMSchedulers set up like SD1.5's).

The oracles restate Flow-GRPO's `sde_step_with_logprob` and DDPO's `ddim_step_with_logprob` formula by
formula: the index through the scheduler's own `index_for_timestep`, the noise through diffusers'
`randn_tensor`. Each runs in float64 (the exact value) and in fp32 (what the original computes). A
drop-in's output and its gradient to model_output through log_prob must be no further from float64
than 4x the original's own fp32 error plus 4 units in the last place of the output dtype.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from fusedrl.integrations.dance_grpo import flux_step  # noqa: E402
from fusedrl.integrations.ddpo import ddim_step_with_logprob  # noqa: E402
from fusedrl.integrations.flow_grpo import sde_step_with_logprob  # noqa: E402
from fusedrl.kernels import flow_sde_step  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The schedulers stay on the CPU; on a GPU machine the latents are on the GPU (as in the trainers).
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
BACKENDS = ["torch", "triton"] + (["cuda"] if DEVICE == "cuda" else [])
LATENT = (4, 9, 7)  # channels, height, width: odd sizes
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
HALF_MIXES = [(torch.float16, torch.float16), (torch.float16, torch.float32), (torch.float32, torch.float16)]
# The Triton interpreter warns (numpy) on the 1 / std^2 and log(std) it computes, unused, when std = 0.
DETERMINISTIC = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
SD15_DDIM = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                 clip_sample=False, set_alpha_to_one=False)


@pytest.fixture(params=BACKENDS)
def backend(request, use_backend):
    use_backend(request.param)
    return request.param


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    return scheduler


def ddim_scheduler(**config) -> DDIMScheduler:
    scheduler = DDIMScheduler(**{**SD15_DDIM, **config})
    scheduler.set_timesteps(50)
    return scheduler


def randn(batch: int, seed: int, dtype=torch.float32, grad: bool = False) -> torch.Tensor:
    t = torch.randn((batch,) + LATENT, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    return t.requires_grad_(grad)


def seeded(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mean_over_latent(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=tuple(range(1, t.ndim)))


# ----------------------------------------------------------------------------- oracles


def flow_grpo_oracle(scheduler, model_output, timestep, sample, noise_level=0.7, prev_sample=None,
                     generator=None, sde_type="sde", dtype=torch.float64):
    """Flow-GRPO's sde_step_with_logprob, computed in `dtype` -> (prev, log_prob, mean, std_dev_t)."""
    v, x = model_output.float(), sample.float()
    noise = None if prev_sample is not None else randn_tensor(v.shape, generator=generator, device=v.device,
                                                              dtype=v.dtype)
    index = [scheduler.index_for_timestep(t) for t in torch.as_tensor(timestep).cpu()]
    view = (-1,) + (1,) * (x.ndim - 1)
    sigma = scheduler.sigmas[index].view(view).to(x.device, dtype)
    sigma_next = scheduler.sigmas[[i + 1 for i in index]].view(view).to(x.device, dtype)
    sigma_max = scheduler.sigmas[1].item()
    v, x, dt = v.to(dtype), x.to(dtype), sigma_next - sigma
    if sde_type == "sde":
        std = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
        mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
        scale = std * torch.sqrt(-dt)
    else:
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        mean = (x - sigma * v) * (1 - sigma_next) + (x + (1 - sigma) * v) * torch.sqrt(sigma_next**2 - std**2)
        scale = std
    prev = mean + scale * noise.to(dtype) if prev_sample is None else prev_sample.float().to(dtype)
    if sde_type == "sde":
        log_prob = -((prev.detach() - mean) ** 2) / (2 * scale**2) - torch.log(scale) - LOG_SQRT_2PI
    else:
        log_prob = -((prev.detach() - mean) ** 2)
    return prev, _mean_over_latent(log_prob), mean, std


def dance_schedule(steps: int = 10, shift: float = 3.0) -> torch.Tensor:
    """DanceGRPO's sigmas: sd3_time_shift(shift, linspace(1, 0, steps + 1))."""
    t = torch.linspace(1, 0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def dance_oracle(model_output, latents, eta, sigmas, index, prev_sample=None, dtype=torch.float64):
    """DanceGRPO's flux_step (grpo=True, sde_solver=True) in its score form, in `dtype` -> (prev, x0, log_prob).
    New noise: torch.randn_like of the fp32 mean, from the global generator (seed it before calling)."""
    sigma, sigma_next = float(sigmas[index]), float(sigmas[index + 1])
    v, x = model_output.to(dtype), latents.to(dtype)
    x0 = x - sigma * v
    score = -(x - x0 * (1 - sigma)) / sigma**2
    mean = x + (sigma_next - sigma) * v + (-0.5 * eta**2 * score) * (sigma_next - sigma)
    scale = eta * math.sqrt(sigma - sigma_next)
    if prev_sample is None:
        prev = mean + torch.randn_like(mean.float()).to(dtype) * scale
    else:
        prev = prev_sample.to(dtype)
    log_prob = -((prev.detach() - mean) ** 2) / (2 * scale**2)  # the original drops the Gaussian's constants
    return prev, x0, _mean_over_latent(log_prob)


def ddpo_oracle(scheduler, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False,
                generator=None, prev_sample=None, dtype=torch.float64):
    """DDPO's ddim_step_with_logprob, computed in `dtype` -> (prev, log_prob, mean). The fp32 one casts
    prev to sample.dtype as the original does; the float64 one keeps the exact value."""
    cfg, T = scheduler.config, scheduler.config.num_train_timesteps
    noise = None if prev_sample is not None else randn_tensor(
        model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
    t = torch.as_tensor(timestep).cpu().reshape(-1)
    prev_t = (t - T // scheduler.num_inference_steps).clamp(0, T - 1)
    view = (-1,) + (1,) * (sample.ndim - 1)
    a_t, a_p = (scheduler.alphas_cumprod[i].view(view).to(sample.device, dtype) for i in (t, prev_t))
    m, x = model_output.to(dtype), sample.to(dtype)
    if cfg.prediction_type == "epsilon":
        x0, eps = (x - (1 - a_t) ** 0.5 * m) / a_t**0.5, m
    elif cfg.prediction_type == "sample":
        x0, eps = m, (x - a_t**0.5 * m) / (1 - a_t) ** 0.5
    else:
        x0, eps = a_t**0.5 * x - (1 - a_t) ** 0.5 * m, a_t**0.5 * m + (1 - a_t) ** 0.5 * x
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    std = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)) ** 0.5
    if use_clipped_model_output:
        eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
    mean = a_p**0.5 * x0 + (1 - a_p - std**2) ** 0.5 * eps
    prev = mean + std * noise.to(dtype) if prev_sample is None else prev_sample.to(dtype)
    log_prob = -((prev.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return (prev if dtype == torch.float64 else prev.type(sample.dtype)), _mean_over_latent(log_prob), mean


# ----------------------------------------------------------------------------- checks


def assert_parity(got, exact, original, what: str = "") -> None:
    """got (drop-in) is within 4x the original's fp32 error of the float64 value, plus 4 ulp."""
    assert got.shape == original.shape and got.dtype == original.dtype, (what, got.shape, got.dtype)
    err = (got.double() - exact.double()).abs().max().item()
    base = (original.double() - exact.double()).abs().max().item()
    ulp = torch.finfo(got.dtype).eps * max(1.0, exact.detach().abs().max().item())
    assert err <= 4 * base + 4 * ulp, f"{what}: error {err:.3g}, the original's {base:.3g}, ulp {ulp:.3g}"


def assert_outputs_match(got, exact, original) -> None:
    for i, (g, e, o) in enumerate(zip(got, exact, original)):
        assert_parity(g.detach(), e.detach(), o.detach(), f"output {i}")


def assert_logp_grads_match(wrt, got_logp, exact_logp, original_logp) -> None:
    """The gradient of a weighted sum of log_prob to `wrt` (the model output) matches the oracle's."""
    weights = torch.linspace(0.5, 1.5, got_logp.shape[0], device=got_logp.device)
    grads = [torch.autograd.grad((weights.to(lp.dtype) * lp).sum(), wrt)[0]
             for lp in (got_logp, exact_logp, original_logp)]
    assert_parity(*grads, "d log_prob / d model_output")


# ----------------------------------------------------------------------------- Flow-GRPO

FLOW_STEPS = {"first": [0, 0, 0], "mixed": [0, 3, 7, 9], "last": [9, 9]}  # indices into the 10 timesteps


@pytest.mark.parametrize("given", [False, True], ids=["sampled", "given"])
@pytest.mark.parametrize("steps", list(FLOW_STEPS))
@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_flow_grpo_matches_original(backend, sde_type, steps, given):
    scheduler = flow_scheduler()
    t = scheduler.timesteps[FLOW_STEPS[steps]]
    B = len(t)
    x, v = randn(B, 1), randn(B, 2, grad=True)
    prev = None
    if given:  # a sample from an earlier rollout, drawn with another seed
        prev = flow_grpo_oracle(scheduler, v, t, x, generator=seeded(123), sde_type=sde_type,
                                dtype=torch.float32)[0].detach()
    gen = lambda: None if given else seeded()
    got = sde_step_with_logprob(scheduler, v, t.to(DEVICE), x, 0.7, prev, gen(), sde_type)
    exact = flow_grpo_oracle(scheduler, v, t, x, 0.7, prev, gen(), sde_type)
    original = flow_grpo_oracle(scheduler, v, t, x, 0.7, prev, gen(), sde_type, dtype=torch.float32)
    assert_outputs_match(got, exact, original)
    if given:
        assert torch.equal(got[0], prev)
    assert_logp_grads_match(v, got[1], exact[1], original[1])


# ----------------------------------------------------------------------------- DanceGRPO


@pytest.mark.parametrize("given", [False, True], ids=["sampled", "given"])
@pytest.mark.parametrize("index", [0, 4, 9])  # sigma = 1 (first), mid, into sigma = 0 (last)
def test_dance_grpo_matches_original(backend, index, given):
    sigmas = dance_schedule()
    x, v = randn(3, 1), randn(3, 2, grad=True)
    prev = None
    if given:
        torch.manual_seed(123)
        prev = dance_oracle(v, x, 0.3, sigmas, index, dtype=torch.float32)[0].detach()
    torch.manual_seed(5)
    got = flux_step(v, x, 0.3, sigmas, index, prev_sample=prev, grpo=True, sde_solver=True)
    torch.manual_seed(5)
    exact = dance_oracle(v, x, 0.3, sigmas, index, prev)
    torch.manual_seed(5)
    original = dance_oracle(v, x, 0.3, sigmas, index, prev, dtype=torch.float32)
    assert_outputs_match(got, exact, original)
    assert_logp_grads_match(v, got[2], exact[2], original[2])
    # the kernel's own log-prob keeps the Gaussian's constants: the same up to one constant per step
    scale = 0.3 * math.sqrt(float(sigmas[index] - sigmas[index + 1]))
    own = flow_sde_step(x, v.detach(), float(sigmas[index]), float(sigmas[index + 1]), noise_level=0.3,
                        sde_type="dance", prev_sample=got[0])
    torch.testing.assert_close(own.logp, got[2] - math.log(scale) - LOG_SQRT_2PI, rtol=1e-5, atol=1e-5)


def test_dance_grpo_mean_and_refusals(backend):
    sigmas = dance_schedule()
    x, v = randn(2, 1), randn(2, 2)
    mean, x0 = flux_step(v, x, 0.3, sigmas, 3, prev_sample=None, grpo=False, sde_solver=True)
    exact_prev, exact_x0, _ = dance_oracle(v, x, 0.3, sigmas, 3, prev_sample=x)  # prev unused: take the mean
    sigma, sigma_next = float(sigmas[3]), float(sigmas[4])
    score = -(x.double() - exact_x0 * (1 - sigma)) / sigma**2
    exact_mean = x.double() + (sigma_next - sigma) * (v.double() - 0.5 * 0.09 * score)
    torch.testing.assert_close(mean.double(), exact_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0.double(), exact_x0, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="sde_solver=False"):
        flux_step(v, x, 0.3, sigmas, 3, None, grpo=True, sde_solver=False)
    with pytest.raises(ValueError, match="index must be"):
        flux_step(v, x, 0.3, sigmas, 10, None, grpo=True, sde_solver=True)
    with pytest.raises(ValueError, match="index must be"):
        flux_step(v, x, 0.3, sigmas, torch.tensor(1.0), None, grpo=True, sde_solver=True)
    # DanceGRPO's training loop indexes with a 0-dim int64 tensor (perms[i][j])
    torch.testing.assert_close(flux_step(v, x, 0.3, sigmas, torch.tensor(3), x, grpo=True, sde_solver=True)[2],
                               flux_step(v, x, 0.3, sigmas, 3, x, grpo=True, sde_solver=True)[2])
    with pytest.raises(ValueError, match="eta must be"):
        flux_step(v, x, 0.0, sigmas, 3, None, grpo=True, sde_solver=True)


@pytest.mark.parametrize("x_dtype,v_dtype", HALF_MIXES)
def test_flow_grpo_half_precision_inputs_give_fp32_results(backend, x_dtype, v_dtype):
    scheduler = flow_scheduler()
    t = scheduler.timesteps[FLOW_STEPS["mixed"]]
    x, v = randn(4, 1, x_dtype), randn(4, 2, v_dtype, grad=True)
    got = sde_step_with_logprob(scheduler, v, t, x, generator=seeded())
    exact = flow_grpo_oracle(scheduler, v, t, x, generator=seeded())
    original = flow_grpo_oracle(scheduler, v, t, x, generator=seeded(), dtype=torch.float32)
    assert_outputs_match(got, exact, original)
    assert_logp_grads_match(v, got[1], exact[1], original[1])


def test_flow_grpo_generator_list_draws_per_sample(backend):
    scheduler = flow_scheduler()
    t = scheduler.timesteps[[1, 5, 8]]
    x, v = randn(3, 1), randn(3, 2)
    gens = lambda: [seeded(s) for s in (3, 4, 5)]
    got = sde_step_with_logprob(scheduler, v, t, x, generator=gens())
    exact = flow_grpo_oracle(scheduler, v, t, x, generator=gens())
    original = flow_grpo_oracle(scheduler, v, t, x, generator=gens(), dtype=torch.float32)
    assert_outputs_match(got, exact, original)


def test_flow_grpo_repeated_timestep_takes_its_second_occurrence(backend):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(timesteps=[1000.0, 750.0, 750.0, 750.0, 500.0, 250.0],
                            sigmas=[1.0, 0.8, 0.7, 0.6, 0.5, 0.2])
    assert scheduler.index_for_timestep(torch.tensor(750.0)) == 2
    t = torch.tensor([750.0, 1000.0, 750.0, 250.0])
    x, v = randn(4, 1), randn(4, 2)
    got = sde_step_with_logprob(scheduler, v, t, x, generator=seeded())
    exact = flow_grpo_oracle(scheduler, v, t, x, generator=seeded())
    original = flow_grpo_oracle(scheduler, v, t, x, generator=seeded(), dtype=torch.float32)
    assert_outputs_match(got, exact, original)


def test_flow_grpo_timestep_forms_agree(backend):
    """A [B] tensor, a list of 0-dim tensors (what iterating one gives), a list of floats, and one
    value for the whole batch give the same step."""
    scheduler = flow_scheduler()
    t = scheduler.timesteps[[4, 4, 4]]
    x, v = randn(3, 1), randn(3, 2)
    step = lambda timestep: sde_step_with_logprob(scheduler, v, timestep, x, generator=seeded())
    want = step(t)
    for form in (list(t), t.tolist(), t[0], float(t[0])):
        for a, b in zip(step(form), want):
            assert torch.equal(a, b)


def test_flow_grpo_timestep_not_in_schedule_is_an_error(backend):
    scheduler = flow_scheduler()
    t = torch.tensor([scheduler.timesteps[0].item(), 123.5])
    with pytest.raises(ValueError, match=r"timestep \[123\.5\] is not in scheduler\.timesteps"):
        sde_step_with_logprob(scheduler, randn(2, 2), t, randn(2, 1))


def test_flow_grpo_batch_size_mismatch_is_an_error():
    scheduler = flow_scheduler()
    with pytest.raises(ValueError, match="timestep must have shape"):
        sde_step_with_logprob(scheduler, randn(3, 2), scheduler.timesteps[:2], randn(3, 1))


@DETERMINISTIC
def test_flow_grpo_deterministic_sde_step_is_the_euler_step(backend):
    """noise_level = 0: the original's log_prob is NaN (0 / 0); the drop-in returns None, and its
    sample is the scheduler's own Euler step."""
    scheduler = flow_scheduler()
    t = scheduler.timesteps[3]
    x, v = randn(2, 1), randn(2, 2)
    prev, log_prob, mean, std = sde_step_with_logprob(scheduler, v, t.repeat(2), x, noise_level=0.0)
    assert log_prob is None and torch.equal(prev, mean) and torch.all(std == 0)
    euler = scheduler.step(v, t, x).prev_sample
    torch.testing.assert_close(prev, euler, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("given", [False, True], ids=["sampled", "given"])
def test_flow_grpo_deterministic_cps_step_keeps_its_log_prob(backend, given):
    """Under "cps" the original's log_prob has no 1 / std, so it is finite at noise_level = 0."""
    scheduler = flow_scheduler()
    t = scheduler.timesteps[[2, 6]]
    x, v = randn(2, 1), randn(2, 2, grad=True)
    prev = randn(2, 3) if given else None
    got = sde_step_with_logprob(scheduler, v, t, x, 0.0, prev, sde_type="cps")
    exact = flow_grpo_oracle(scheduler, v, t, x, 0.0, prev, sde_type="cps")
    original = flow_grpo_oracle(scheduler, v, t, x, 0.0, prev, sde_type="cps", dtype=torch.float32)
    assert_outputs_match(got, exact, original)
    assert_logp_grads_match(v, got[1], exact[1], original[1])


# ----------------------------------------------------------------------------- DDPO

DDIM_STEPS = {"first": [0, 0, 0], "mixed": [0, 17, 33, 49], "last": [49, 49]}  # indices into the 50 timesteps
CLIPS = {"none": ({}, False), "clip": ({"clip_sample": True}, False), "clip-clipped_eps": ({"clip_sample": True}, True)}


@pytest.mark.parametrize("given", [False, True], ids=["sampled", "given"])
@pytest.mark.parametrize("steps", list(DDIM_STEPS))
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpo_matches_original(backend, prediction_type, clip, steps, given):
    config, clipped_eps = CLIPS[clip]
    scheduler = ddim_scheduler(prediction_type=prediction_type, **config)
    t = scheduler.timesteps[DDIM_STEPS[steps]]
    B = len(t)
    x, m = randn(B, 1), randn(B, 2, grad=True)
    prev = None
    if given:
        prev = ddpo_oracle(scheduler, m, t, x, 1.0, clipped_eps, seeded(123), dtype=torch.float32)[0].detach()
    gen = lambda: None if given else seeded()
    got = ddim_step_with_logprob(scheduler, m, t.to(DEVICE), x, 1.0, clipped_eps, gen(), prev)
    exact = ddpo_oracle(scheduler, m, t, x, 1.0, clipped_eps, gen(), prev)
    original = ddpo_oracle(scheduler, m, t, x, 1.0, clipped_eps, gen(), prev, dtype=torch.float32)
    assert_outputs_match(got, exact[:2], original[:2])
    assert_logp_grads_match(m, got[1], exact[1], original[1])


@pytest.mark.parametrize("x_dtype,m_dtype", HALF_MIXES)
def test_ddpo_half_precision(backend, x_dtype, m_dtype):
    """Math in fp32 (DDPO's alphas are fp32 tensors), noise drawn in model_output's dtype,
    prev_sample returned in sample's dtype."""
    scheduler = ddim_scheduler()
    t = scheduler.timesteps[DDIM_STEPS["mixed"]]
    x, m = randn(4, 1, x_dtype), randn(4, 2, m_dtype, grad=True)
    got = ddim_step_with_logprob(scheduler, m, t, x, eta=1.0, generator=seeded())
    exact = ddpo_oracle(scheduler, m, t, x, eta=1.0, generator=seeded())
    original = ddpo_oracle(scheduler, m, t, x, eta=1.0, generator=seeded(), dtype=torch.float32)
    assert got[0].dtype == x_dtype
    assert_outputs_match(got, exact[:2], original[:2])
    assert_logp_grads_match(m, got[1], exact[1], original[1])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpo_seeded_sample_equals_diffusers_ddim_step(backend, prediction_type):
    """Away from the last step DDPO's sample is DDIMScheduler.step's, noise included."""
    scheduler = ddim_scheduler(prediction_type=prediction_type, clip_sample=True)
    t = scheduler.timesteps[20]
    x, m = randn(2, 1), randn(2, 2)
    prev, _ = ddim_step_with_logprob(scheduler, m, int(t), x, eta=1.0, generator=seeded())
    want = scheduler.step(m, t, x, eta=1.0, generator=seeded()).prev_sample
    torch.testing.assert_close(prev, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_ddpo_zero_terminal_snr_first_step(backend, prediction_type):
    """rescale_betas_zero_snr: alphas_cumprod is 0 at the first (trailing) timestep. With v / sample prediction
    nothing is divided by sqrt(alpha_t) (x0 = -v), as diffusers' own step takes it: the step and its log-prob
    match DDPO's formula (its direction term, 0 there in exact arithmetic, clamped at 0 against rounding)."""
    scheduler = ddim_scheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                               prediction_type=prediction_type)
    assert scheduler.alphas_cumprod[int(scheduler.timesteps[0])] == 0
    t = scheduler.timesteps[[0, 0, 10]]
    x, m = randn(3, 1), randn(3, 2, grad=True)
    got = ddim_step_with_logprob(scheduler, m, t.to(DEVICE), x, 1.0, generator=seeded())
    exact = ddpo_oracle(scheduler, m, t, x, 1.0, generator=seeded())
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[0].double(), exact[0].double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1].double(), exact[1].double(), rtol=1e-4, atol=1e-4)
    want = scheduler.step(m[:1].detach(), int(t[0]), x[:1], eta=1.0, generator=seeded()).prev_sample
    assert torch.isfinite(want).all()


def test_ddpo_zero_terminal_snr_refuses_epsilon_prediction():
    scheduler = ddim_scheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    t = scheduler.timesteps[[0]]
    with pytest.raises(ValueError, match=r"alpha_t must lie in \(0, 1\) with epsilon prediction"):
        ddim_step_with_logprob(scheduler, randn(1, 2), t, randn(1, 1), 1.0, generator=seeded())


@DETERMINISTIC
def test_ddpo_clamps_the_previous_timestep_at_the_last_step(backend):
    """At t = 1 the previous timestep is -19: DDPO clamps it to 0 (alphas_cumprod[0]) where diffusers'
    step uses final_alpha_cumprod (1.0 with set_alpha_to_one=True)."""
    scheduler = ddim_scheduler(set_alpha_to_one=True)
    t = scheduler.timesteps[-1]
    assert t == 1
    x, m = randn(2, 1), randn(2, 2)
    prev, log_prob = ddim_step_with_logprob(scheduler, m, t, x)
    exact = ddpo_oracle(scheduler, m, t.repeat(2), x)
    original = ddpo_oracle(scheduler, m, t.repeat(2), x, dtype=torch.float32)
    assert log_prob is None
    assert_parity(prev, exact[2], original[2], "prev_sample")
    assert not torch.allclose(prev, scheduler.step(m, t, x).prev_sample, atol=1e-3)


@DETERMINISTIC
@pytest.mark.parametrize("timestep_form", ["int", "0-dim", "[B]"])
def test_ddpo_eta_zero_gives_the_mean_and_no_log_prob(backend, timestep_form):
    """eta = 0: the original's log_prob is NaN (0 / 0); the drop-in returns None and the mean."""
    scheduler = ddim_scheduler()
    t = scheduler.timesteps[10]
    timestep = {"int": int(t), "0-dim": t, "[B]": t.repeat(3)}[timestep_form]
    x, m = randn(3, 1), randn(3, 2)
    prev, log_prob = ddim_step_with_logprob(scheduler, m, timestep, x, eta=0.0)
    exact = ddpo_oracle(scheduler, m, t.repeat(3), x)
    original = ddpo_oracle(scheduler, m, t.repeat(3), x, dtype=torch.float32)
    assert log_prob is None and torch.isnan(original[1]).all()
    assert_parity(prev, exact[2], original[2], "prev_sample")
    torch.testing.assert_close(prev, scheduler.step(m, t, x, eta=0.0).prev_sample, rtol=1e-5, atol=1e-5)


def test_ddpo_thresholding_is_refused():
    scheduler = ddim_scheduler(thresholding=True)
    with pytest.raises(ValueError, match="thresholding"):
        ddim_step_with_logprob(scheduler, randn(2, 2), scheduler.timesteps[0], randn(2, 1), eta=1.0)


def test_ddpo_scheduler_errors():
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(DDIMScheduler(**SD15_DDIM), randn(2, 2), 981, randn(2, 1))
    with pytest.raises(TypeError, match="DDIMScheduler"):
        ddim_step_with_logprob(flow_scheduler(), randn(2, 2), 981, randn(2, 1))


def test_ddpo_timestep_errors():
    scheduler = ddim_scheduler()
    with pytest.raises(ValueError, match=r"timestep \[1000\] is outside \[0, 999\]"):
        ddim_step_with_logprob(scheduler, randn(2, 2), torch.tensor([981, 1000]), randn(2, 1))
    with pytest.raises(TypeError, match="integer"):
        ddim_step_with_logprob(scheduler, randn(2, 2), torch.tensor([981.0, 961.0]), randn(2, 1))
    with pytest.raises(ValueError, match="shape"):
        ddim_step_with_logprob(scheduler, randn(2, 2), scheduler.timesteps[:3], randn(2, 1))


# ----------------------------------------------------------------------------- devices


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheduler_device", ["cpu", "cuda"])
def test_schedulers_and_latents_on_different_devices(use_backend, scheduler_device):
    """The schedule tensors may sit on the CPU (diffusers' default) or on the GPU with the latents."""
    use_backend("torch")  # any backend: this is about the lookups; the Triton interpreter cannot run CUDA tensors
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow.set_timesteps(10, device=scheduler_device)
    ddim = ddim_scheduler()
    ddim.alphas_cumprod = ddim.alphas_cumprod.to(scheduler_device)
    x, v = (torch.randn((3,) + LATENT, generator=seeded(s)).cuda() for s in (1, 2))
    t = flow.timesteps[[0, 4, 9]].cuda()
    got = sde_step_with_logprob(flow, v, t, x, generator=seeded())
    want = flow_grpo_oracle(flow, v, t, x, generator=seeded(), dtype=torch.float32)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    t = ddim.timesteps[[0, 25, 49]].cuda()
    prev, log_prob = ddim_step_with_logprob(ddim, v, t, x, eta=1.0, generator=seeded())
    want = ddpo_oracle(ddim, v, t, x, eta=1.0, generator=seeded(), dtype=torch.float32)
    torch.testing.assert_close(prev, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_prob, want[1], rtol=1e-5, atol=1e-5)
