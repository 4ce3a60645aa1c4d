"""Cases of the diffusion-step op: Flow-GRPO's SDE step and DDPO's DDIM step.

Shapes ("default" are the latents of real trainers; "small" run in seconds on a CPU):
- flow_sde_step, "sde", noise_level 0.7: SD3 / Flux at 1024 px, B=24 x 16 x 128 x 128
  (small: 4 x 16 x 32 x 32)
- ddim_step, epsilon prediction, eta 1: SD1.5 at 512 px, B=32 x 4 x 64 x 64 (small: 4 x 4 x 32 x 32)
The per-sample sigmas / alphas are [B] fp32 tensors on the device, as trainers pass them.

Modes:
- "fwd":       the rollout: noise z drawn, prev_sample = mean + scale z, under torch.no_grad.
- "fwd_given": the training pass's forward: prev_sample given, x and the model output require grad
               (so the memory column shows what is held for backward).
- "fwd+bwd":   "fwd_given" then the gradient of logp.sum() with respect to the model output and x.

Minimal bytes (N = elements of x, e = bytes per element of the case's dtype): the bytes that a
fused implementation must move at least, ignoring the [B] per-sample tensors:
- fwd:       read x, m, z; write mean, prev_sample            -> 5 N e
- fwd_given: read x, m, prev_sample; write mean               -> 4 N e
- fwd+bwd:   fwd_given, then read x, m, prev_sample again and write dx, dm -> 9 N e
Drawing z (writing it) is not counted: every provider draws it the same way, outside the step.

Providers: "eager" calls `reference.flow_sde_step` / `reference.ddim_step` (the trainers' formula)
directly; "compile" is `torch.compile` of that same call; "torch" / "triton" / "cuda" call the public
`fusedrl.kernels.flow_sde_step` / `ddim_step` with that backend forced.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from fusedrl.kernels import ddim_step, flow_sde_step
from fusedrl.kernels.diffusion_step import reference
from fusedrl.kernels.diffusion_step.api import SPEC

from ..providers import COMPILE, EAGER, STANDARD, Impl, pick
from . import Case, CaseConfig

SHAPES = {
    "default": {"flow_sde_step": (24, 16, 128, 128), "ddim_step": (32, 4, 64, 64)},
    "small": {"flow_sde_step": (4, 16, 32, 32), "ddim_step": (4, 4, 32, 32)},
}
MODES = ("fwd", "fwd_given", "fwd+bwd")
BYTES_PER_ELEMENT_MOVED = {"fwd": 5, "fwd_given": 4, "fwd+bwd": 9}
NOISE_LEVEL = 0.7
ETA = 1.0
# Mid-trajectory values: sigma < 1 needs no sigma_max; alphas_cumprod at t and at prev_t > t.
PARAMS = {"flow_sde_step": (0.8, 0.75), "ddim_step": (0.5, 0.6)}

# A step as a function of (x, m, p0, p1, noise, prev): m is the model output, p0/p1 the [B] sigmas
# (flow) or alphas_cumprod (DDIM); exactly one of noise / prev is given.
Formula = Callable[..., tuple]


def _flow_formula(x, m, p0, p1, noise, prev):
    return reference.flow_sde_step(x, m, p0, p1, noise_level=NOISE_LEVEL, sde_type="sde",
                                   sigma_max=float("nan"), noise=noise, prev_sample=prev, ref_mean=None,
                                   want_logp=True, out_dtype=x.dtype)


def _ddim_formula(x, m, p0, p1, noise, prev):
    return reference.ddim_step(m, x, p0, p1, eta=ETA, prediction_type="epsilon", clip_sample_range=None,
                               use_clipped_model_output=False, noise=noise, prev_sample=prev, ref_mean=None,
                               want_logp=True, out_dtype=x.dtype)


def _flow_public(x, m, p0, p1, prev):
    return flow_sde_step(x, m, p0, p1, noise_level=NOISE_LEVEL, sde_type="sde", prev_sample=prev)


def _ddim_public(x, m, p0, p1, prev):
    return ddim_step(m, x, p0, p1, eta=ETA, prediction_type="epsilon", prev_sample=prev)


OPS = {"flow_sde_step": (_flow_formula, _flow_public), "ddim_step": (_ddim_formula, _ddim_public)}


def _with_noise(formula: Formula) -> Callable:
    """The formula with the public function's signature; z is drawn when no prev_sample is given."""

    def step(x, m, p0, p1, prev):
        return formula(x, m, p0, p1, torch.randn_like(m) if prev is None else None, prev)

    return step


def _timed_call(mode: str, step: Callable, x, m, p0, p1, prev) -> Callable[[], object]:
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return step(x, m, p0, p1, None)
    elif mode == "fwd_given":
        def fn():
            return step(x, m, p0, p1, prev)
    else:
        def fn():
            logp = step(x, m, p0, p1, prev)[1]
            return torch.autograd.grad(logp.sum(), (x, m))
    return fn


def _setup(op: str, mode: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    formula, public = OPS[op]
    B = shape[0]
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    m = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    prev = torch.randn(shape, dtype=dtype, device=device)
    p0 = torch.full((B,), PARAMS[op][0], dtype=torch.float32, device=device)
    p1 = torch.full((B,), PARAMS[op][1], dtype=torch.float32, device=device)
    inputs = (x, m, prev, p0, p1)

    def impl(provider: str) -> Impl:
        step, env = pick(provider, eager=formula, public=public, spec=SPEC, tensors=(x, m, prev))
        if provider in (EAGER, COMPILE):
            step = _with_noise(step)
        return Impl(_timed_call(mode, step, x, m, p0, p1, prev), env=env, inputs=inputs,
                    error_is_skip=provider == COMPILE, random_output=mode == "fwd")

    return impl


def cases(config: CaseConfig) -> list[Case]:
    found = []
    for op, shape in SHAPES[config.sizes].items():
        numel = math.prod(shape)
        for mode in MODES:
            for dtype in config.dtypes:
                nbytes = BYTES_PER_ELEMENT_MOVED[mode] * numel * dtype.itemsize
                setup = functools.partial(_setup, op, mode, shape, dtype, config.device)
                found.append(Case(op=op, mode=mode, shape=shape, dtype=dtype, bytes=nbytes,
                                  providers=STANDARD, setup=setup))
    return found
