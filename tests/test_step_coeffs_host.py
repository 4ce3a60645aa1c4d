"""The CUDA kernels' per-sample step coefficients (csrc/step_coeffs.cuh), compiled as plain C++ on the host
and checked against the float64 reference (kernels/diffusion_step/reference.py) for every mode the CUDA
extension serves: flow "sde" (sigma == 1 included), "cps", "dance", and DDIM with each prediction type,
x0 clipping and the clipped model output.

Every mode-specific line of the CUDA diffusion step lives in that header; the rest of the kernel is the same
affine map and reduction for every mode. So this checks, with no GPU, the part of the CUDA path that differs
between modes - "dance" included, which no GPU has run yet. The mode and prediction codes passed in are the
Python side's own (api.SDE_TYPES, api.DDIM, api.PREDICTION_TYPES), so a code that drifted between the two
sides fails here too. Each case runs on two builds where the CPU allows: without fused multiply-adds, and with
every a * b + c contracted to one, as nvcc and Triton do on a GPU (which turned CPS at noise_level 1 into NaN).
"""

from __future__ import annotations

import ctypes
import math
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fusedrl.kernels.diffusion_step import api, reference

CSRC = Path(__file__).resolve().parents[1] / "csrc"
WRAPPER = """
#include "step_coeffs.cuh"
extern "C" void step_coefficients(float p0, float p1, float level, float sigma_max, int mode, int pred,
                                  int has_clip, int clipped_eps, float* out) {
  const fusedrl::StepCoeffs k = fusedrl::step_coefficients(p0, p1, level, sigma_max, mode, pred, has_clip != 0,
                                                           clipped_eps != 0);
  const float v[9] = {k.a, k.b, k.c, k.p, k.q, k.scale, k.std, k.cq, k.c0};
  for (int i = 0; i < 9; ++i) out[i] = v[i];
}
"""
D = 257
SIGMA_MAX = 0.9965  # a 28-step SD3 schedule's sigmas[1], the value "sde" takes at sigma == 1


def f32(value: float) -> float:
    """The kernels take fp32 scalars: the reference gets the same rounded values (1 - sigma_max alone would
    magnify sigma_max's rounding 285x)."""
    return float(torch.tensor(value, dtype=torch.float32))


def _contraction_flags() -> list[list[str]]:
    """Builds to test: without fused multiply-adds, and with every a * b + c contracted to one where the CPU has
    them, as nvcc and Triton contract (a formula that cancels, such as sigma_next^2 - std^2 at std = sigma_next,
    turns negative there by the rounding of the product: NaN after a square root)."""
    flags = [["-ffp-contract=off"]]
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        flags.append(["-ffp-contract=fast"])
    elif machine in ("x86_64", "amd64"):
        try:
            has_fma = " fma " in f" {Path('/proc/cpuinfo').read_text().replace(chr(10), ' ')} "
        except OSError:
            has_fma = False
        if has_fma:
            flags.append(["-ffp-contract=fast", "-mfma"])
    return flags


@pytest.fixture(scope="module", params=_contraction_flags(), ids=lambda f: "fma" if "fast" in f[0] else "no-fma")
def coefficients(request, tmp_path_factory):
    """step_coefficients(...) -> dict of the nine fp32 coefficients, from the header built by the host compiler."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler (c++, g++ or clang++) on PATH")
    build = tmp_path_factory.mktemp("step_coeffs")
    source = build / "wrapper.cpp"
    source.write_text(WRAPPER)
    library = build / "libstep_coeffs.so"
    cmd = [cxx, "-std=c++17", "-O2", *request.param, "-fPIC", "-shared", f"-I{CSRC}", str(source), "-o",
           str(library)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr}"
    lib = ctypes.CDLL(str(library))
    lib.step_coefficients.restype = None
    lib.step_coefficients.argtypes = [ctypes.c_float] * 4 + [ctypes.c_int] * 4 + [ctypes.POINTER(ctypes.c_float)]

    def call(p0, p1, level, sigma_max, mode, pred=0, has_clip=False, clipped_eps=False):
        out = (ctypes.c_float * 9)()
        lib.step_coefficients(p0, p1, level, sigma_max, mode, pred, int(has_clip), int(clipped_eps), out)
        return dict(zip(("a", "b", "c", "p", "q", "scale", "std", "cq", "c0"), (float(v) for v in out)))

    return call


def _inputs(seed: int, x_scale: float = 1.0):
    """x, m (fp32 values held in float64, as the kernels read them) and a standard normal z."""
    g = torch.Generator().manual_seed(seed)
    x = (x_scale * torch.randn(1, D, generator=g)).double()
    m = torch.randn(1, D, generator=g).double()
    z = torch.randn(1, D, generator=g, dtype=torch.float64)
    return x, m, z


def _check(k, x, m, z, step, clip=None):
    """The coefficients' mean and logp, computed in float64 from the nine fp32 coefficients, against the reference.

    `step(x, m, prev) -> (mean, std, scale, logp)` runs the reference in x's dtype. The criterion is DESIGN.md's: the
    error vs float64 is at most a small multiple of the fp32 torch formula's, plus an fp32 ulp of the output.
    """
    mean64, _, scale64, _ = step(x, m, None)
    prev = mean64 + scale64 * z  # a sample of the reference's own transition
    mean64, std64, _, logp64 = step(x, m, prev)
    mean32, std32, _, logp32 = step(x.float(), m.float(), prev.float())
    mean = k["a"] * x + k["b"] * m
    if clip is not None:
        mean = mean + k["c"] * (k["p"] * x + k["q"] * m).clamp(-clip, clip)
    ulp = torch.finfo(torch.float32).eps
    err, err32 = (mean - mean64).abs().max(), (mean32.double() - mean64).abs().max()
    assert err <= 4 * err32 + ulp * mean64.abs().max(), (float(err), float(err32))
    assert abs(k["std"] - float(std64)) <= 4 * abs(float(std32) - float(std64)) + ulp * float(std64)
    logp = k["cq"] * ((prev - mean) ** 2).mean() + k["c0"]
    err, err32 = abs(float(logp - logp64)), abs(float(logp32.double() - logp64))
    assert err <= 4 * err32 + ulp * (1.0 + abs(float(logp64))), (err, err32)


def _flow_step(sigma, sigma_next, noise_level, sde_type):
    def step(x, v, prev):
        out = reference.flow_sde_step(
            x, v, torch.tensor([sigma], dtype=x.dtype), torch.tensor([sigma_next], dtype=x.dtype),
            noise_level=noise_level, sde_type=sde_type, sigma_max=f32(SIGMA_MAX),
            noise=torch.zeros_like(x) if prev is None else None, prev_sample=prev, ref_mean=None,
            want_logp=prev is not None, out_dtype=x.dtype)
        _, logp, mean, std, _ = out
        scale = std if sde_type == "cps" else std * math.sqrt(sigma - sigma_next)
        return mean, std, scale, logp
    return step


FLOW_CASES = [
    ("sde", 1.0, 0.9965, 0.7),  # the first step: std evaluated at sigma_max
    ("sde", 0.9, 0.85, 0.7),
    ("sde", 0.5, 0.45, 1.0),
    ("sde", 0.1, 0.0, 0.7),  # the last step
    ("cps", 1.0, 0.95, 0.7),
    ("cps", 0.6, 0.5, 0.5),
    ("cps", 0.05, 0.02, 0.9),
    ("cps", 0.2, 0.1, 1.0),  # level = 1: std = sigma_next, the mean's x1 term vanishes
    ("cps", 0.95, 0.9, 1.0),
    ("cps", 0.4, 0.3, 1.0),
    ("dance", 1.0, 0.95, 0.3),
    ("dance", 0.5, 0.45, 0.3),
    ("dance", 0.04, 0.0, 0.1),
]


@pytest.mark.parametrize("sde_type, sigma, sigma_next, noise_level", FLOW_CASES)
def test_flow_coefficients_match_the_reference(coefficients, sde_type, sigma, sigma_next, noise_level):
    level = math.sin(noise_level * math.pi / 2) if sde_type == "cps" else noise_level  # as api.flow_sde_step passes
    if sde_type == "cps":
        noise_level = math.asin(f32(level)) * 2 / math.pi  # the reference takes sin() of it
    else:
        noise_level = f32(noise_level)
    sigma, sigma_next = f32(sigma), f32(sigma_next)
    k = coefficients(sigma, sigma_next, level, SIGMA_MAX, api.SDE_TYPES[sde_type])
    x, v, z = _inputs(round(1000 * sigma))
    _check(k, x, v, z, _flow_step(sigma, sigma_next, noise_level, sde_type))


def _sd15_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # "scaled_linear"
    return torch.cumprod(1 - betas, 0)


DDIM_STEPS = [(999, 979), (501, 481), (21, 1), (1, 0)]  # (t, t_prev); t_prev = 0 reads alphas_cumprod[0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip, clipped_eps", [(None, False), (1.0, False), (1.0, True)])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_coefficients_match_the_reference(coefficients, prediction_type, clip, clipped_eps, eta):
    ac = _sd15_alphas_cumprod()
    for t, t_prev in DDIM_STEPS:
        alpha_t, alpha_prev = float(ac[t]), float(ac[t_prev])
        alpha_t, alpha_prev = f32(alpha_t), f32(alpha_prev)
        k = coefficients(alpha_t, alpha_prev, eta, float("nan"), api.DDIM, api.PREDICTION_TYPES[prediction_type],
                         clip is not None, clipped_eps)
        x, m, z = _inputs(t, x_scale=3.0)  # x0 beyond the clip range for some elements at every step

        def step(x, m, prev, alpha_t=alpha_t, alpha_prev=alpha_prev):
            _, logp, mean, std, _ = reference.ddim_step(
                m, x, torch.tensor([alpha_t], dtype=x.dtype), torch.tensor([alpha_prev], dtype=x.dtype), eta=eta,
                prediction_type=prediction_type, clip_sample_range=clip, use_clipped_model_output=clipped_eps,
                noise=torch.zeros_like(x) if prev is None else None, prev_sample=prev, ref_mean=None,
                want_logp=prev is not None, out_dtype=x.dtype)
            return mean, std, std, logp
        _check(k, x, m, z, step, clip=clip)


def test_flow_modes_differ_where_their_formulas_do(coefficients):
    """A guard on the test itself: the three flow modes give different steps at the same sigmas."""
    got = {t: coefficients(0.6, 0.55, 0.7, SIGMA_MAX, api.SDE_TYPES[t]) for t in ("sde", "cps", "dance")}
    assert len({(k["a"], k["b"], k["std"]) for k in got.values()}) == 3
