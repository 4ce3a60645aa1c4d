"""Bad input to the diffusion steps gives a clear ValueError/TypeError naming what is wrong."""

from __future__ import annotations

import pytest
import torch

from fusedrl.kernels import ddim_step, flow_sde_step

X = torch.randn(2, 3, 5)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: flow_sde_step(X, torch.randn(2, 3, 4), 0.5, 0.4), ValueError, r"v has shape \(2, 3, 4\)"),
        (lambda: flow_sde_step(X, X.to("meta"), 0.5, 0.4), ValueError,
         "v is on meta but x is on cpu"),
        (lambda: flow_sde_step(X.long(), X, 0.5, 0.4), TypeError, "x must be a floating-point tensor"),
        (lambda: flow_sde_step(X, X.int(), 0.5, 0.4), TypeError, "v must be a floating-point tensor"),
        (lambda: flow_sde_step(X.numpy(), X, 0.5, 0.4), TypeError, "x must be a torch.Tensor"),
        (lambda: flow_sde_step(X, X, 0.4, 0.5), ValueError, "sigma_next must be < sigma"),
        (lambda: flow_sde_step(X, X, 0.4, 0.4), ValueError, "sigma_next must be < sigma"),
        (lambda: flow_sde_step(X, X, torch.tensor([0.5, 0.3]), torch.tensor([0.4, 0.35])), ValueError,
         "sigma_next must be < sigma"),
        (lambda: flow_sde_step(X, X, torch.tensor([0.5, 0.3, 0.2]), 0.1), ValueError, r"sigma must be a float or "
         r"have shape \[B\] = \[2\]"),
        (lambda: flow_sde_step(X, X, 1.5, 0.4), ValueError, r"sigma must be finite and lie in \(0, 1\]"),
        (lambda: flow_sde_step(X, X, 0.5, -0.1), ValueError, "sigma_next must be finite and >= 0"),
        (lambda: flow_sde_step(X, X, 1.0, 0.9), ValueError, "sigma == 1 needs sigma_max"),
        (lambda: flow_sde_step(X, X, float("nan"), 0.4), ValueError, "sigma must be finite"),
        (lambda: flow_sde_step(X, X, "0.5", 0.4), TypeError, "sigma must be a float or a tensor"),
        (lambda: flow_sde_step(X, X, 0.5, 0.4, noise_level=-0.1), ValueError, "noise_level must be >= 0"),
        (lambda: flow_sde_step(X, X, 0.5, 0.4, sde_type="ode"), ValueError, "sde_type must be one of"),
        (lambda: flow_sde_step(X, X, 0.5, 0.4, prev_sample=X, generator=torch.Generator()), ValueError,
         "either prev_sample or generator"),
        (lambda: flow_sde_step(X, X, 0.5, 0.4, prev_sample=X[:1]), ValueError, "prev_sample has shape"),
        (lambda: flow_sde_step(X, X, 0.5, 0.4, ref_mean=X.long()), TypeError, "ref_mean must be a floating"),
        (lambda: flow_sde_step(X, X, 0.5, 0.4, generator=[torch.Generator()] * 3), ValueError,
         "a list of 3 generators for a batch of 2"),
        (lambda: flow_sde_step(torch.empty(0, 3), torch.empty(0, 3), 0.5, 0.4), ValueError, "B >= 1"),
        (lambda: ddim_step(X, X, 0.5, 0.6, eta=-1.0), ValueError, "eta must be >= 0"),
        (lambda: ddim_step(X, X, 0.5, 0.6, eta=True), TypeError, "eta must be a finite float"),
        (lambda: ddim_step(X, X, 0.5, 0.6, prediction_type="flow"), ValueError, "prediction_type must be one of"),
        (lambda: ddim_step(X, X, 1.0, 1.0), ValueError, r"alpha_t must lie in \(0, 1\)"),
        (lambda: ddim_step(X, X, 0.5, 0.0), ValueError, r"alpha_prev must lie in \(0, 1\]"),
        (lambda: ddim_step(X, X, 0.5, 0.6, clip_sample_range=0.0), ValueError, "clip_sample_range must be"),
        (lambda: ddim_step(X, X.half()[:, :2], 0.5, 0.6), ValueError, "model_output has shape"),
        (lambda: ddim_step(X, X, 0.5, 0.6, eta=0.0, ref_mean=X), ValueError, "std\\^2, which is 0 at eta=0"),
        (lambda: ddim_step(X, X, 0.6, 0.5), ValueError, "alpha_prev must be > alpha_t"),  # swapped: NaN before
        (lambda: ddim_step(X, X, 0.5, 0.5, eta=1.0), ValueError, "equal only at eta=0"),
        (lambda: ddim_step(X, X, 0.5, 1.0), ValueError, "alpha_prev = 1 makes the step deterministic"),
        (lambda: ddim_step(X, X, 0.5, 0.6, clip_sample_range=True), ValueError, "clip_sample_range must be"),
        (lambda: flow_sde_step(X, X, 0.5, 0.0, sde_type="cps", ref_mean=X), ValueError,
         "0 for a CPS step into sigma_next = 0"),
        (lambda: flow_sde_step(X, X, 1.0, 0.5, sigma_max=True), ValueError, "sigma_max must be a float"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_sigma_max_as_the_schedulers_tensor():
    """sigma_max=scheduler.sigmas[1], a 0-dim tensor, as the docstring says to pass it."""
    want = flow_sde_step(X, X, 1.0, 0.5, sigma_max=0.75, prev_sample=X)
    got = flow_sde_step(X, X, 1.0, 0.5, sigma_max=torch.tensor(0.75), prev_sample=X)
    torch.testing.assert_close(got.logp, want.logp)


def test_integer_sigma_tensors_are_accepted_as_values():
    out = flow_sde_step(X, X, torch.tensor([1, 1]) * 0.5, 0.25)
    assert out.logp.shape == (2,)


def test_ddim_step_into_its_own_alpha_is_the_identity_at_eta_0():
    """t = 0 to its clamped prev_t = 0 (the last step of "linspace" spacing): diffusers returns x itself."""
    x, out = torch.randn(2, 6, generator=torch.Generator().manual_seed(0)), torch.randn(2, 6)
    step = ddim_step(out, x, 0.999, 0.999, eta=0.0)
    torch.testing.assert_close(step.prev_sample.float(), x, atol=1e-5, rtol=0)
    assert step.logp is None
