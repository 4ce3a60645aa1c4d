"""Numerical tests of flow_sde_step / ddim_step on every backend that runs here, against float64.

Criterion (DESIGN.md): a backend's error vs the float64 reference is at most a small multiple of the
error of the same-dtype torch formula, plus one unit in the last place of the output dtype.
Every gradient (x, model output, ref_mean) is checked, through logp, mean, kl and a sampled prev.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from fusedrl.kernels import ddim_step, dispatch, flow_sde_step
from fusedrl.kernels.diffusion_step import reference
from fusedrl.kernels.diffusion_step.noise import randn_like_diffusers

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
BACKENDS = ["torch", "triton"] + (["cuda"] if DEVICE == "cuda" else [])
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
SHAPES = [(3, 4, 33, 17), (2, 1025), (1, 5)]


def _case(kind: str):
    """-> (call(x, m, **kw) -> StepOutput, oracle(x, m, noise, prev, ref, out_dtype) -> tuple)."""
    if kind.startswith("flow"):
        sde_type = kind.split("-")[1]
        sigma = torch.tensor([1.0, 0.63, 0.21])
        # the last step (sigma_next = 0) has std = 0 under "cps", where the KL term is undefined
        sigma_next = torch.tensor([0.93, 0.5, 0.04 if sde_type == "cps" else 0.0])
        level = 0.3 if sde_type == "dance" else 0.7
        kw = dict(noise_level=level, sde_type=sde_type, sigma_max=0.93)

        def call(x, m, **extra):
            B = x.shape[0]
            return flow_sde_step(x, m, sigma[:B], sigma_next[:B], **kw, **extra)

        def oracle(x, m, noise, prev, ref, out_dtype):
            B = x.shape[0]
            return reference.flow_sde_step(
                x, m, sigma[:B].double(), sigma_next[:B].double(), noise_level=level, sde_type=sde_type,
                sigma_max=0.93, noise=noise, prev_sample=prev, ref_mean=ref, want_logp=True, out_dtype=out_dtype)

        return call, oracle
    _, pred, *rest = kind.split("-")
    prediction_type = {"eps": "epsilon", "sample": "sample", "v": "v_prediction"}[pred]
    clip = 1.0 if "clip" in rest else None
    clipped_eps = "clipeps" in rest
    alpha_t = torch.tensor([0.05, 0.5, 0.93])
    alpha_prev = torch.tensor([0.08, 0.62, 0.9991])
    kw = dict(eta=1.0, prediction_type=prediction_type, clip_sample_range=clip, use_clipped_model_output=clipped_eps)

    def call(x, m, **extra):
        B = x.shape[0]
        return ddim_step(m, x, alpha_t[:B], alpha_prev[:B], **kw, **extra)

    def oracle(x, m, noise, prev, ref, out_dtype):
        B = x.shape[0]
        return reference.ddim_step(
            m, x, alpha_t[:B].double(), alpha_prev[:B].double(), eta=1.0, prediction_type=prediction_type,
            clip_sample_range=clip, use_clipped_model_output=clipped_eps, noise=noise, prev_sample=prev,
            ref_mean=ref, want_logp=True, out_dtype=out_dtype)

    return call, oracle


KINDS = ["flow-sde", "flow-cps", "flow-dance", "ddim-eps", "ddim-sample", "ddim-v", "ddim-eps-clip",
         "ddim-v-clip-clipeps"]


def _max_err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None and b is None:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def _ulp(t: torch.Tensor, dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps * max(1.0, t.detach().abs().max().item())


def _outputs_and_grads(call_out, inputs, weights, sampled):
    prev, logp, mean, std, kl = call_out
    loss = (logp * weights["logp"]).sum() + (mean.double() * weights["mean"]).sum() + (kl * weights["kl"]).sum()
    if sampled:
        loss = loss + (prev.double() * weights["prev"]).sum()
    grads = torch.autograd.grad(loss, inputs)
    return (prev, logp, mean, std, kl), grads


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "given"])
def test_matches_float64(kind, backend, dtype, shape, sampled, use_backend):
    if shape[0] > 3:
        pytest.skip("schedules cover 3 samples")
    torch.manual_seed(hash((kind, shape, sampled)) % 2**31)
    call, oracle = _case(kind)
    x64 = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    m64 = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    ref64 = x64 + 0.1 * torch.randn_like(x64)
    x = x64.to(dtype).requires_grad_()
    m = m64.to(dtype).requires_grad_()
    ref = ref64.to(dtype).requires_grad_()
    noise = None
    prev = None
    extra = {"ref_mean": ref}
    if sampled:
        extra["generator"] = torch.Generator(device=DEVICE).manual_seed(7)
        noise = randn_like_diffusers(shape, torch.Generator(device=DEVICE).manual_seed(7), x.device, dtype)
    else:
        prev = (x64 + 0.3 * torch.randn_like(x64)).to(dtype)
        extra["prev_sample"] = prev
    weights = {k: torch.randn(s, dtype=torch.float64, device=DEVICE)
               for k, s in (("logp", shape[:1]), ("kl", shape[:1]), ("mean", shape), ("prev", shape))}

    # float64 oracle on the very same (rounded) inputs and noise
    xo, mo, refo = (t.detach().double().requires_grad_() for t in (x, m, ref))
    exp_out, exp_grads = _outputs_and_grads(
        oracle(xo, mo, None if noise is None else noise.double(), None if prev is None else prev.double(), refo,
               torch.float64), (xo, mo, refo), weights, sampled)
    # the same formula in torch at the input dtype (math in fp32): the error budget
    use_backend("torch")
    base_out, base_grads = _outputs_and_grads(call(x, m, **extra), (x, m, ref), weights, sampled)
    if sampled:  # same seed -> same noise on every backend
        extra["generator"] = torch.Generator(device=DEVICE).manual_seed(7)
    use_backend(backend)
    got_out, got_grads = _outputs_and_grads(call(x, m, **extra), (x, m, ref), weights, sampled)

    names = ["prev_sample", "logp", "mean", "std", "kl"]
    out_dtype = got_out[2].dtype
    assert got_out[2].dtype == base_out[2].dtype == torch.promote_types(dtype, dtype)
    for name, got, base, exp in zip(names, got_out, base_out, exp_out):
        if name == "prev_sample" and not sampled:
            assert got is prev
            continue
        tol_dtype = out_dtype if name in ("prev_sample", "mean") else torch.float32
        budget = 4 * _max_err(base, exp) + 2 * _ulp(exp, tol_dtype) + 1e-6 * max(1.0, exp.abs().max().item())
        assert _max_err(got, exp) <= budget, f"{name}: err {_max_err(got, exp):.3g} > {budget:.3g}"
    for name, got, base, exp in zip(["x", "model_output", "ref_mean"], got_grads, base_grads, exp_grads):
        budget = 4 * _max_err(base, exp) + 2 * _ulp(exp, dtype) + 1e-6 * max(1.0, exp.abs().max().item())
        assert _max_err(got, exp) <= budget, f"grad {name}: err {_max_err(got, exp):.3g} > {budget:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend, use_backend):
    use_backend(backend)
    base = torch.randn(2, 17, 3, 5, device=DEVICE)
    x = base.permute(0, 2, 1, 3)  # [2, 3, 17, 5], not contiguous
    v = torch.randn(2, 5, 3, 17, device=DEVICE).permute(0, 2, 3, 1)
    prev = torch.randn(2, 3, 17, 5, device=DEVICE)[:, :, :, :]
    got = flow_sde_step(x, v, 0.7, 0.5, prev_sample=prev)
    want = flow_sde_step(x.contiguous(), v.contiguous(), 0.7, 0.5, prev_sample=prev.contiguous())
    torch.testing.assert_close(got.logp, want.logp)
    torch.testing.assert_close(got.mean, want.mean)
    assert got.mean.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sde_type", ["sde", "cps", "dance"])
def test_very_small_std(backend, sde_type, use_backend):
    """noise_level 1e-3 near the end of the schedule: std*sqrt(-dt) ~ 1e-5, logp ~ +10."""
    use_backend(backend)
    torch.manual_seed(0)
    x64 = torch.randn(2, 4, 9, 9, dtype=torch.float64, device=DEVICE)
    v64 = torch.randn_like(x64)
    sigma, sigma_next = torch.tensor([0.011, 0.02]), torch.tensor([0.01, 0.015])
    out = flow_sde_step(x64.float(), v64.float(), sigma, sigma_next, noise_level=1e-3, sde_type=sde_type,
                        generator=torch.Generator(device=DEVICE).manual_seed(3))
    assert torch.isfinite(out.logp).all()
    z = randn_like_diffusers((2, 4, 9, 9), torch.Generator(device=DEVICE).manual_seed(3), x64.device, torch.float32)
    exp = reference.flow_sde_step(x64, v64, sigma.double(), sigma_next.double(), noise_level=1e-3,
                                  sde_type=sde_type, sigma_max=float("nan"), noise=z.double(), prev_sample=None,
                                  ref_mean=None, want_logp=True, out_dtype=torch.float64)
    # the noise part of prev - mean is std-sized; its log-density error is relative to that
    torch.testing.assert_close(out.logp.double(), exp[1], rtol=1e-3, atol=1e-3 * exp[1].abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_cps_at_noise_level_one(backend, use_backend):
    """noise_level = 1: std = sigma_next, so the mean is x0 (1 - sigma_next) exactly. sqrt(sigma_next^2 - std^2)
    contracted to an fma (nvcc, Triton on a GPU) was the rounding of sigma_next^2: NaN for about half the sigmas,
    a 1e-3 error in the mean for others (tests/test_step_coeffs_host.py shows it on the host with -mfma)."""
    use_backend(backend)
    torch.manual_seed(0)
    x, v = torch.randn(4, 3, 33, device=DEVICE), torch.randn(4, 3, 33, device=DEVICE)
    sigma = torch.tensor([1.0, 0.95, 0.4, 0.2], device=DEVICE)
    sigma_next = torch.tensor([0.95, 0.9, 0.3, 0.1], device=DEVICE)
    out = flow_sde_step(x, v, sigma, sigma_next, noise_level=1.0, sde_type="cps", prev_sample=x)
    x0 = x - sigma[:, None, None] * v
    torch.testing.assert_close(out.mean, x0 * (1 - sigma_next[:, None, None]), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(out.logp).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_steps_have_no_logp(backend, use_backend):
    use_backend(backend)
    x, m = torch.randn(2, 3, 8, device=DEVICE), torch.randn(2, 3, 8, device=DEVICE)
    out = ddim_step(m, x, 0.4, 0.6, eta=0.0)
    assert out.logp is None and out.kl is None
    torch.testing.assert_close(out.prev_sample, out.mean)
    assert torch.isfinite(out.mean).all()
    out = flow_sde_step(x, m, 0.5, 0.4, noise_level=0.0)
    assert out.logp is None
    torch.testing.assert_close(out.mean, x + m * (0.4 - 0.5))
    # "cps" drops the constants: its logp is -(prev - mean)^2, finite (0 when sampled) at std = 0
    out = flow_sde_step(x, m, 0.5, 0.4, noise_level=0.0, sde_type="cps")
    torch.testing.assert_close(out.logp, torch.zeros(2, device=DEVICE))
    torch.testing.assert_close(out.prev_sample, out.mean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_sample_equals_diffusers_randn_tensor(backend, use_backend):
    diffusers_utils = pytest.importorskip("diffusers.utils.torch_utils")
    use_backend(backend)
    x, v = torch.randn(3, 4, 6, 6, device=DEVICE), torch.randn(3, 4, 6, 6, device=DEVICE)
    gens = [torch.Generator(device=DEVICE).manual_seed(i) for i in range(3)]
    out = flow_sde_step(x, v, 0.8, 0.7, generator=gens)
    z = diffusers_utils.randn_tensor((3, 4, 6, 6), generator=[torch.Generator(device=DEVICE).manual_seed(i)
                                                              for i in range(3)], device=x.device, dtype=v.dtype)
    scale = out.std * math.sqrt(0.1)
    torch.testing.assert_close(out.prev_sample, out.mean + scale.view(-1, 1, 1, 1) * z, rtol=1e-6, atol=1e-6)


def test_auto_dispatch_on_cuda_tensors_follows_each_ops_measured_order(monkeypatch):
    """On CUDA tensors auto-dispatch tries an op's `auto_order`: Triton before the CUDA extension for the ops
    whose Triton kernels measured faster (diffusion_step, grpo_loss), the CUDA extension first for the others;
    a backend that cannot serve is passed over, and FUSEDRL_BACKEND still forces one."""
    import types

    from fusedrl.kernels import grpo_loss  # noqa: F401  (registers its spec)

    monkeypatch.delenv(dispatch.ENV_BACKEND, raising=False)
    fake = types.SimpleNamespace(device=torch.device("cuda"))  # select reads only .device; why_not is mocked
    refused: set = set()
    monkeypatch.setattr(dispatch, "why_not", lambda spec, backend, tensors: "no" if backend in refused else None)
    for op, first in (("diffusion_step", "triton"), ("grpo_loss", "triton"), ("logprobs_from_logits", "cuda")):
        assert dispatch.select(dispatch.OPS[op], [fake]).value == first, op
    refused.add(dispatch.Backend.TRITON)  # e.g. no triton package: the CUDA extension serves
    assert dispatch.select(dispatch.OPS["diffusion_step"], [fake]) is dispatch.Backend.CUDA
    monkeypatch.setenv(dispatch.ENV_BACKEND, "cuda")
    refused.clear()
    assert dispatch.select(dispatch.OPS["logprobs_from_logits"], [fake]) is dispatch.Backend.CUDA


def test_auto_dispatch_picks_triton_under_interpreter(monkeypatch):
    if not INTERPRET:
        pytest.skip("interpreter-mode dispatch")
    monkeypatch.delenv("FUSEDRL_BACKEND", raising=False)
    x = torch.randn(2, 3)
    assert dispatch.select(dispatch.OPS["diffusion_step"], [x]) is dispatch.Backend.TRITON
    # bf16 is refused by the interpreter and falls back to torch
    assert dispatch.select(dispatch.OPS["diffusion_step"], [x.bfloat16()]) is dispatch.Backend.TORCH


def test_forced_backend_that_cannot_serve_says_why(use_backend):
    use_backend("cuda")
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="FUSEDRL_BACKEND=cuda cannot run diffusion_step: tensors on cpu"):
        flow_sde_step(x, x, 0.5, 0.4)


def test_unknown_forced_backend(use_backend):
    use_backend("cudnn")
    with pytest.raises(ValueError, match="FUSEDRL_BACKEND='cudnn' is not a backend"):
        flow_sde_step(torch.randn(2, 3), torch.randn(2, 3), 0.5, 0.4)
