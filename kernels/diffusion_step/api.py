"""Public diffusion-step functions: validation, noise, dispatch, and the `StepOutput` NamedTuple."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import dispatch
from . import reference
from .noise import GeneratorArg, randn_like_diffusers
from .op import DiffusionStep
from .triton_kernels import DDIM, FLOW_CPS, FLOW_DANCE, FLOW_SDE, PRED_EPSILON, PRED_SAMPLE, PRED_V

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PREDICTION_TYPES = {"epsilon": PRED_EPSILON, "sample": PRED_SAMPLE, "v_prediction": PRED_V}
SDE_TYPES = {"sde": FLOW_SDE, "cps": FLOW_CPS, "dance": FLOW_DANCE}

SPEC = dispatch.register_op(
    dispatch.OpSpec(
        name="diffusion_step",
        backends=(dispatch.Backend.TORCH, dispatch.Backend.TRITON, dispatch.Backend.CUDA),
        auto_order=dispatch.TRITON_FIRST,  # measured faster than the CUDA kernels (dispatch.TRITON_FIRST)
    )
)


class StepOutput(NamedTuple):
    """One denoising transition.

    prev_sample: [B, ...] the next latent (sampled, or the given one returned as is).
    logp:        [B] fp32 log-probability of prev_sample, MEAN over non-batch dims; None for a
                 deterministic step whose log-density divides by std = 0 (DDIM eta = 0, "sde" or
                 "dance" at noise_level = 0), where the trainers' formulas give NaN.
    mean:        [B, ...] the transition mean (differentiable).
    std:         [B] fp32 the step's std (Flow-GRPO's `std_dev_t`, DDPO's `std_dev_t`; DanceGRPO's eta).
    kl:          [B] fp32 MEAN((mean - ref_mean)^2) / (2 std^2) when ref_mean is given, else None.
    """

    prev_sample: torch.Tensor
    logp: torch.Tensor | None
    mean: torch.Tensor
    std: torch.Tensor
    kl: torch.Tensor | None


# ----------------------------------------------------------------------------- validation


def _check_tensor(name: str, t, like: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor (fp16, bf16, fp32 or fp64), got {t.dtype}")
    if like is None:
        if t.ndim < 1 or t.shape[0] == 0:
            raise ValueError(f"{name} must have shape [B, ...] with B >= 1, got {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{name} has no elements (shape {tuple(t.shape)})")
    else:
        if t.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but must match x's shape {tuple(like.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but x is on {like.device}; put all inputs on one device")
    return t


def _per_sample(name: str, value, batch: int, device: torch.device) -> tuple[torch.Tensor, list[float] | None]:
    """A float or a [B] / [] tensor -> ([B] fp32 tensor on device, its values as floats for checks, or None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor of shape [B], got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        return torch.full((batch,), float(value), dtype=torch.float32, device=device), [float(value)] * batch
    if value.dtype not in FLOATS and value.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.ndim > 1 or (value.ndim == 1 and value.shape[0] not in (1, batch)):
        raise ValueError(f"{name} must be a float or have shape [B] = [{batch}], got {tuple(value.shape)}")
    if value.device.type != "cpu" and value.device != device:
        raise ValueError(f"{name} is on {value.device} but x is on {device}")
    t = value.detach().to(device=device, dtype=torch.float32).reshape(-1).expand(batch).contiguous()
    # Values are checked on the host only where that is free: a CPU tensor outside torch.compile
    # (a check on a GPU tensor would sync the stream; under compile it would break the graph).
    if value.device.type != "cpu" or torch.compiler.is_compiling():
        return t, None
    return t, value.detach().double().reshape(-1).expand(batch).tolist()


def _check_values(name: str, values: list[float] | None, ok, rule: str) -> None:
    if values is not None and not all(math.isfinite(v) and ok(v) for v in values):
        raise ValueError(f"{name} must {rule}, got {values}")


def _prepare(x, m, prev_sample, generator, ref_mean, x_name: str, m_name: str):
    _check_tensor(x_name, x)
    _check_tensor(m_name, m, like=x)
    if prev_sample is not None:
        _check_tensor("prev_sample", prev_sample, like=x)
        if generator is not None:
            raise ValueError("pass either prev_sample or generator, not both: a given prev_sample draws no noise")
    if ref_mean is not None:
        _check_tensor("ref_mean", ref_mean, like=x)


# ----------------------------------------------------------------------------- dispatch and run


def _run(kind: int, x, m, p0, p1, *, level, sigma_max, pred, clip, clipped_eps, noise, prev_sample, ref_mean,
         want_logp, out_dtype, reference_fn):
    tensors = [x, m] + [t for t in (noise, prev_sample, ref_mean) if t is not None]
    backend = dispatch.select(SPEC, tensors)
    if backend is dispatch.Backend.TORCH:
        return reference_fn()
    B = x.shape[0]
    flat = lambda t: None if t is None else t.reshape(B, -1).contiguous()
    prev, mean, logp, kl, std = DiffusionStep.apply(
        flat(x), flat(m), p0, p1, flat(noise), flat(prev_sample), flat(ref_mean),
        kind, pred, float(level), float(sigma_max), float(clip), bool(clipped_eps), bool(want_logp), out_dtype,
        backend.value,
    )
    return (
        prev.reshape(x.shape) if noise is not None else prev_sample,
        logp if want_logp else None,
        mean.reshape(x.shape),
        std,
        kl if ref_mean is not None else None,
    )


def flow_sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    noise_level: float = 0.7,
    sde_type: str = "sde",
    prev_sample: torch.Tensor | None = None,
    generator: GeneratorArg = None,
    sigma_max: float | None = None,
    ref_mean: torch.Tensor | None = None,
) -> StepOutput:
    """One Flow-GRPO (or DanceGRPO) SDE step of a flow-matching model, with its Gaussian log-probability.

    Args:
        x: [B, ...] current latent, fp32/fp16/bf16 (math in fp32), any layout.
        v: [B, ...] model output (velocity), same shape and device as x.
        sigma, sigma_next: floats or [B] tensors, the scheduler's sigmas[i] and sigmas[i + 1]
            (sigma_next < sigma).
        noise_level: the `a` of Flow-GRPO (0.7 default; DanceGRPO's `eta` under "dance", which its
            scripts set to 0.3); 0 gives the deterministic (ODE) step, whose logp is None under "sde" and
            "dance" (it would divide by std = 0).
        sde_type: "sde" (Flow-GRPO), "cps" (coefficients-preserving sampling) or "dance" (DanceGRPO's
            `flux_step` with sde_solver=True: the "sde" step with std = noise_level at every sigma).
        prev_sample: [B, ...] a given next latent (data: no gradient flows into it); else one is
            sampled as mean + std sqrt(-dt) z ("sde", "dance") or mean + std z ("cps"), z drawn like
            diffusers' `randn_tensor(v.shape, generator, v.device, v.dtype)`.
        sigma_max: scheduler.sigmas[1], used in place of sigma where sigma == 1 ("sde"). Needed at sigma == 1:
            refused without it when sigma is a float or a CPU tensor; a GPU tensor's values are not read (no host
            sync), and the step there comes out NaN, as the formula gives.
        ref_mean: [B, ...] the reference policy's mean (adapter-off model) for the KL term.

    Returns:
        StepOutput(prev_sample, logp [B], mean, std [B], kl [B] or None). prev_sample (when
        sampled) and mean come in the promoted dtype of x and v.

    Equivalent PyTorch ("sde"), with dt = sigma_next - sigma, s = sigma_max if sigma == 1 else sigma:
        std = noise_level * sqrt(sigma / (1 - s))
        mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
        prev = mean + std * sqrt(-dt) * z
        logp = Normal(mean, std * sqrt(-dt)).log_prob(prev.detach()).mean(dims 1..)
    "dance" is the same with std = noise_level (DanceGRPO's score form, x + dt (v - noise_level**2 / 2 score) with
    score = -(x - (1 - sigma) x0) / sigma**2, x0 = x - sigma v, expands to this mean). Its logp keeps the
    Gaussian's constants, which DanceGRPO's `flux_step` drops (`fusedrl.integrations.dance_grpo` returns its
    form); the difference is the same for the old and new policy, so ratios agree.
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {sorted(SDE_TYPES)}, got {sde_type!r}")
    _prepare(x, v, prev_sample, generator, ref_mean, "x", "v")
    if not isinstance(noise_level, (int, float)) or isinstance(noise_level, bool) or not math.isfinite(noise_level):
        raise TypeError(f"noise_level must be a finite float, got {noise_level!r}")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    B = x.shape[0]
    s0, h0 = _per_sample("sigma", sigma, B, x.device)
    s1, h1 = _per_sample("sigma_next", sigma_next, B, x.device)
    _check_values("sigma", h0, lambda v: 0 < v <= 1, "be finite and lie in (0, 1]")
    _check_values("sigma_next", h1, lambda v: v >= 0, "be finite and >= 0")
    if h0 is not None and h1 is not None and any(b >= a for a, b in zip(h0, h1)):
        raise ValueError(f"sigma_next must be < sigma (time runs from 1 to 0); got sigma={h0}, sigma_next={h1}")
    if isinstance(sigma_max, torch.Tensor) and sigma_max.numel() == 1:  # scheduler.sigmas[1] as it comes
        sigma_max = float(sigma_max)
    if sigma_max is not None:
        # [0, 1): a one-step schedule has sigmas [1, 0], so sigmas[1] = 0 and std = noise_level there.
        if isinstance(sigma_max, bool) or not isinstance(sigma_max, (int, float)) or not 0 <= sigma_max < 1:
            raise ValueError(f"sigma_max must be a float in [0, 1) (scheduler.sigmas[1]), got {sigma_max!r}")
    elif sde_type == "sde" and h0 is not None and 1.0 in h0:
        raise ValueError("sigma == 1 needs sigma_max (pass scheduler.sigmas[1]): std = sqrt(sigma / (1 - sigma)) "
                         "is infinite there")
    if ref_mean is not None and noise_level == 0:
        raise ValueError("ref_mean: the KL term divides by std^2, which is 0 at noise_level=0")
    if ref_mean is not None and sde_type == "cps" and h1 is not None and 0.0 in h1:
        raise ValueError("ref_mean: the KL term divides by std^2, which is 0 for a CPS step into sigma_next = 0 (the "
                         "last step: leave it out of the KL, as Flow-GRPO's training leaves it out)")

    out_dtype = torch.promote_types(x.dtype, v.dtype)
    # "cps" drops the Gaussian's constants, so its logp stays finite (0 for a sampled step) at std = 0;
    # "sde" and "dance" divide by std, so a deterministic step has no logp.
    want_logp = noise_level > 0 or sde_type == "cps"
    noise = None
    if prev_sample is None:
        noise = randn_like_diffusers(tuple(v.shape), generator, v.device, v.dtype)
    sm = float("nan") if sigma_max is None else float(sigma_max)
    level = math.sin(noise_level * math.pi / 2) if sde_type == "cps" else noise_level
    ref_fn = lambda: reference.flow_sde_step(
        x, v, s0, s1, noise_level=noise_level, sde_type=sde_type, sigma_max=sm, noise=noise,
        prev_sample=prev_sample, ref_mean=ref_mean, want_logp=want_logp, out_dtype=out_dtype)
    return StepOutput(*_run(
        SDE_TYPES[sde_type], x, v, s0, s1, level=level, sigma_max=sm, pred=0, clip=0.0, clipped_eps=False,
        noise=noise, prev_sample=prev_sample, ref_mean=ref_mean, want_logp=want_logp, out_dtype=out_dtype,
        reference_fn=ref_fn))


def ddim_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    alpha_t: float | torch.Tensor,
    alpha_prev: float | torch.Tensor,
    *,
    eta: float = 1.0,
    prediction_type: str = "epsilon",
    clip_sample_range: float | None = None,
    use_clipped_model_output: bool = False,
    prev_sample: torch.Tensor | None = None,
    generator: GeneratorArg = None,
    ref_mean: torch.Tensor | None = None,
) -> StepOutput:
    """One DDIM step with its Gaussian log-probability (DDPO's `ddim_step_with_logprob`).

    Args:
        model_output: [B, ...] the denoiser's output, read by `prediction_type`
            ("epsilon", "sample" or "v_prediction"); fp32/fp16/bf16, math in fp32.
        x: [B, ...] current latent x_t.
        alpha_t, alpha_prev: floats or [B] tensors, alphas_cumprod at t and at the previous
            timestep (DDPO clamps that one to >= 0, so the last step uses alphas_cumprod[0]); alpha_t in
            (0, 1), or [0, 1) with v / sample prediction (0: the first step of a zero-terminal-SNR schedule).
        eta: noise weight, >= 0; eta = 0 is deterministic: prev_sample = mean and logp is None.
        clip_sample_range: clamp the predicted x0 to [-r, r] (scheduler.config.clip_sample).
        use_clipped_model_output: re-derive eps from the clipped x0 (as diffusers and DDPO do).
        prev_sample, generator, ref_mean: as in `flow_sde_step`; noise is drawn in
            model_output.dtype like DDPO's `randn_tensor` call.

    Returns:
        StepOutput(prev_sample, logp [B] or None, mean, std [B], kl [B] or None).

    Equivalent PyTorch (epsilon prediction):
        x0 = (x - sqrt(1 - alpha_t) * eps) / sqrt(alpha_t)            # then clamp(-r, r) if asked
        var = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev); std = eta * sqrt(var)
        mean = sqrt(alpha_prev) * x0 + sqrt(1 - alpha_prev - std**2) * eps
        prev = mean + std * z; logp = Normal(mean, std).log_prob(prev.detach()).mean(dims 1..)
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {sorted(PREDICTION_TYPES)}, got {prediction_type!r}")
    _prepare(x, model_output, prev_sample, generator, ref_mean, "x", "model_output")
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not math.isfinite(eta):
        raise TypeError(f"eta must be a finite float, got {eta!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if clip_sample_range is not None and (isinstance(clip_sample_range, bool) or not (
            isinstance(clip_sample_range, (int, float)) and clip_sample_range > 0)):
        raise ValueError(f"clip_sample_range must be a positive float or None, got {clip_sample_range!r}")
    if ref_mean is not None and eta == 0:
        raise ValueError("ref_mean: the KL term divides by std^2, which is 0 at eta=0")
    B = x.shape[0]
    a0, h0 = _per_sample("alpha_t", alpha_t, B, x.device)
    a1, h1 = _per_sample("alpha_prev", alpha_prev, B, x.device)
    if prediction_type == "epsilon":  # x0 = (x - sqrt(1 - alpha_t) eps) / sqrt(alpha_t)
        _check_values("alpha_t", h0, lambda v: 0 < v < 1, "lie in (0, 1) with epsilon prediction (an alphas_cumprod "
                      "value; sqrt(alpha_t) and 1 - alpha_t are divided by)")
    else:  # v / sample prediction: alpha_t = 0 is zero terminal SNR's first step (x0 = -v), as diffusers steps it
        _check_values("alpha_t", h0, lambda v: 0 <= v < 1, "lie in [0, 1) (an alphas_cumprod value; 1 - alpha_t "
                      "is divided by)")
    _check_values("alpha_prev", h1, lambda v: 0 < v <= 1, "lie in (0, 1] (an alphas_cumprod value)")
    if h0 is not None and h1 is not None:
        # the variance (1 - alpha_t / alpha_prev) would be < 0, or 0 with noise to scale (a step from t = 0 to its
        # clamped prev_t = 0, the end of "linspace" spacing, is the identity step at eta = 0, as diffusers steps it)
        if any(b < a or (b == a and eta > 0) for a, b in zip(h0, h1)):
            raise ValueError(f"alpha_prev must be > alpha_t (the previous timestep is the less noisy one; equal only "
                             f"at eta=0); got alpha_t={h0}, alpha_prev={h1}")
        if eta > 0 and 1.0 in h1:
            raise ValueError("alpha_prev = 1 makes the step deterministic (std 0: no log-prob); step into "
                             "alphas_cumprod[0] as DDPO does, or use eta=0 there")

    out_dtype = torch.promote_types(x.dtype, model_output.dtype)
    want_logp = eta > 0
    noise = None
    if prev_sample is None:
        noise = randn_like_diffusers(tuple(model_output.shape), generator, model_output.device, model_output.dtype)
    ref_fn = lambda: reference.ddim_step(
        model_output, x, a0, a1, eta=eta, prediction_type=prediction_type, clip_sample_range=clip_sample_range,
        use_clipped_model_output=use_clipped_model_output, noise=noise, prev_sample=prev_sample,
        ref_mean=ref_mean, want_logp=want_logp, out_dtype=out_dtype)
    return StepOutput(*_run(
        DDIM, x, model_output, a0, a1, level=eta, sigma_max=float("nan"), pred=PREDICTION_TYPES[prediction_type],
        clip=0.0 if clip_sample_range is None else clip_sample_range, clipped_eps=use_clipped_model_output,
        noise=noise, prev_sample=prev_sample, ref_mean=ref_mean, want_logp=want_logp, out_dtype=out_dtype,
        reference_fn=ref_fn))
