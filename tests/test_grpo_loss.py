"""grpo_loss: every backend that runs here against the float64 reference (TRL's formulas restated;
tests/test_grpo_loss_trl.py checks that reference against TRL's own code)."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from fusedrl.kernels import grpo_loss
from fusedrl.kernels.grpo_loss import reference
from fusedrl.kernels.grpo_loss.op import grpo_rows

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
BACKENDS = ["torch", "triton"] + (["cuda"] if DEVICE == "cuda" else [])
B, T = 3, 1037  # T past one 1024-token tile


def _inputs(dtype, adv_per_token, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.25 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios straddle the clip range
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    # per sequence: one of each sign among the rows that have tokens (row 1 is fully masked)
    adv = (torch.randn(B, T, generator=g, dtype=torch.float64) if adv_per_token
           else torch.tensor([0.8, 0.5, -1.1], dtype=torch.float64))
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[1] = False  # a fully masked sequence
    mask[2, 700:] = False  # a short one
    entropy = torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    return [t.to(DEVICE) for t in (logp.to(dtype), old.to(dtype), adv.to(dtype), mask, ref.to(dtype),
                                   entropy.to(dtype))]


CASES = [
    # (loss_type, importance_level, delta, beta, bias correction, kl estimator)
    *[(lt, lvl, None, 0.04, True, "k3") for lt, lvl in itertools.product(reference.LOSS_TYPES, ("token", "sequence"))],
    ("grpo", "token", 1.3, 0.0, True, "k3"),
    ("dapo", "sequence", 1.05, 0.0, True, "k3"),
    ("grpo", "token", 0.9, 0.0, True, "k3"),  # a delta under 1 + eps_high (TRL takes it: the cap binds first)
    ("dapo", "sequence", 0.7, 0.0, True, "k3"),  # and under 1 - eps_low
    ("bnpo", "token", None, 0.1, False, "k3"),
    ("dr_grpo", "token", None, 0.1, True, "k2"),
    ("luspo", "sequence", None, 0.1, False, "k1"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("adv_per_token", [False, True], ids=["adv[B]", "adv[B,T]"])
@pytest.mark.parametrize("with_old", [True, False], ids=["old", "no-old"])
@pytest.mark.parametrize(("loss_type", "level", "delta", "beta", "bias", "kl"), CASES,
                         ids=lambda v: str(v) if not isinstance(v, float) else f"{v:g}")
def test_matches_float64(loss_type, level, delta, beta, bias, kl, with_old, adv_per_token, dtype, backend,
                         use_backend):
    logp, old, adv, mask, ref, entropy = _inputs(dtype, adv_per_token)
    old = old if with_old else None
    kw = dict(ref_logp=ref, beta=beta, loss_type=loss_type, delta=delta, importance_level=level,
              use_bias_correction_kl=bias, kl_estimator=kl, max_len=T + 5, num_items=1000.0 if loss_type == "dapo"
              else None, entropy=entropy, eps_low=0.2, eps_high=0.28 if loss_type != "cispo" else 1.1)

    def run(dt, fn):
        x = logp.detach().to(dt).requires_grad_()
        cast = lambda t: None if t is None else t.to(dt)
        loss, metrics = fn(x, cast(old), cast(adv), mask, **{**kw, "ref_logp": cast(ref), "entropy": cast(entropy)})
        (grad,) = torch.autograd.grad(loss, x)
        return loss, grad, metrics

    ref_kw = {"sapo_tau": (1.0, 1.05)}
    oracle = lambda *a, **k: reference.grpo_loss(*a, **k, **ref_kw)
    exp = run(torch.float64, oracle)
    base = run(dtype, oracle)  # the formula at the input dtype (math in fp32): the error budget
    use_backend(backend)
    got = run(dtype, grpo_loss)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    err = lambda a, b: (a.double() - b.double()).abs().max().item()
    # the gradient is stored in logp's dtype; in fp16 below 6e-5 that rounds to half the subnormal spacing
    ulp = torch.finfo(dtype).eps * exp[1].abs().max().item() + (2**-25 if dtype == torch.float16 else 0.0)
    # + 1e-5 relative: a GPU's exp (ex2.approx) differs from torch's by ~1e-7, which luspo's per-sequence sums of
    # T token terms grow to ~5e-6 of the loss (H200: 1.5e-5 at a loss of 2.86, Triton and CUDA alike)
    assert err(got[0], exp[0]) <= 4 * err(base[0], exp[0]) + 1e-5 * max(1.0, exp[0].abs().item())
    assert err(got[1], exp[1]) <= 4 * err(base[1], exp[1]) + 2 * ulp
    assert sorted(got[2]) == sorted(exp[2])
    for name in exp[2]:
        assert err(got[2][name], exp[2][name]) <= 4 * err(base[2][name], exp[2][name]) + 1e-6, name
    if loss_type in reference.CLIP_FAMILY and with_old and level == "token" and (delta is None or delta > 1.28):
        # the case is not vacuous: tokens are clipped on both sides (a delta under 1 + eps_high caps every ratio)
        assert exp[2]["clip_ratio/low_mean"] > 0 and exp[2]["clip_ratio/high_mean"] > 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(loss_type="ppo"), ValueError, "loss_type must be one of"),
        (dict(loss_type="vespo"), ValueError, "'vespo' is not supported"),
        (dict(importance_level="seq"), ValueError, "importance_level must be"),
        (dict(kl_estimator="k4"), ValueError, "kl_estimator must be one of"),
        (dict(beta=0.1), ValueError, "ref_logp is required when beta != 0"),
        (dict(loss_type="dr_grpo"), ValueError, "max_len must be a positive int"),
        (dict(eps_low=-0.1), ValueError, "eps_low must be >= 0"),
        (dict(delta=0.0), ValueError, "delta must be > 0"),
        (dict(num_items=0), ValueError, "num_items must be > 0"),
        (dict(sapo_tau=(1.0,)), ValueError, "sapo_tau must be"),
        (dict(sapo_tau=1.0), ValueError, r"sapo_tau must be a pair \(tau_pos, tau_neg\), got 1.0"),
        (dict(beta=-0.1), ValueError, "beta must be >= 0.0, got -0.1"),
        (dict(beta="0.1"), TypeError, "beta must be a finite float"),
    ],
)
def test_bad_options_are_named(kwargs, error, match):
    logp, old, adv, mask, _, _ = _inputs(torch.float32, False)
    with pytest.raises(error, match=match):
        grpo_loss(logp, old, adv, mask, **kwargs)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (lambda l, o, a, m: (l[:, :5], o, a, m), ValueError, "old_logp has shape"),
        (lambda l, o, a, m: (l.long(), o, a, m), TypeError, "logp must be a floating-point tensor"),
        (lambda l, o, a, m: (l, o, a[:2], m), ValueError, r"advantages must have shape \[B\]"),
        (lambda l, o, a, m: (l, o, a, m[:, :3]), ValueError, "mask must be a tensor of shape"),
        (lambda l, o, a, m: (l[0], None, a, m), ValueError, r"logp must have shape \[B, T\]"),
    ],
)
def test_bad_tensors_are_named(args, error, match):
    logp, old, adv, mask, _, _ = _inputs(torch.float32, False)
    with pytest.raises(error, match=match):
        grpo_loss(*args(logp, old, adv, mask))


@pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(), reason="Triton needs a GPU or the interpreter")
def test_opcheck_and_compile(use_backend):
    logp, old, adv, mask, ref, entropy = _inputs(torch.float32, True)
    torch.library.opcheck(grpo_rows, (logp, old, adv, mask.float(), ref, entropy, 0.2, 0.28, 0.0, 0.04, 1.0, 1.05,
                                      0, 0, True, False, True, "triton"))
    use_backend("triton")
    x = logp.clone().requires_grad_()

    def loss_fn(x):
        loss, metrics = grpo_loss(x, old, adv, mask, ref_logp=ref, beta=0.04, loss_type="grpo")
        return loss + 0 * metrics["kl"]

    got = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(x)
    (g1,) = torch.autograd.grad(got, x)
    want = loss_fn(x)
    (g2,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g1, g2)


def test_trl_layout_of_advantages_is_per_sequence():
    """TRL keeps per-sequence advantages as [B, 1]: the same loss as [B]."""
    logp, old, adv, mask, _, _ = _inputs(torch.float32, False)
    assert torch.equal(grpo_loss(logp, old, adv[:, None], mask)[0], grpo_loss(logp, old, adv, mask)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_logp_gets_a_gradient(backend, use_backend):
    """old_logp passed without .detach() (on policy), ref_logp and advantages that require grad: data on every
    backend (the torch path differentiated them, the kernels did not: a zero gradient on one, not on the other)."""
    use_backend(backend)
    logp, _, adv, mask, ref, _ = _inputs(torch.float32, False)
    logp = logp.clone().requires_grad_()
    adv, ref = adv.clone().requires_grad_(), ref.clone().requires_grad_()
    loss, _ = grpo_loss(logp, logp, adv, mask, ref_logp=ref, beta=0.1)
    loss.backward()
    want = grpo_loss(logp.detach().requires_grad_(), logp.detach(), adv.detach(), mask, ref_logp=ref.detach(),
                     beta=0.1)[0]
    assert adv.grad is None and ref.grad is None and logp.grad.abs().sum() > 0
    torch.testing.assert_close(loss, want)


def test_num_items_tensor_is_one_positive_number():
    logp, old, adv, mask, _, _ = _inputs(torch.float32, False)
    with pytest.raises(ValueError, match=r"num_items must be a number or a one-element tensor"):
        grpo_loss(logp, old, adv, mask, num_items=torch.tensor([3.0, 4.0], device=logp.device))
    if logp.device.type == "cpu":
        with pytest.raises(ValueError, match=r"num_items must be > 0, got -7.0"):
            grpo_loss(logp, old, adv, mask, num_items=torch.tensor(-7.0))
    one = grpo_loss(logp, old, adv, mask, num_items=torch.tensor([300.0], device=logp.device))[0]
    assert one.shape == () and torch.equal(one, grpo_loss(logp, old, adv, mask, num_items=300.0)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_token_completions_average_metrics_over_kept_tokens(backend, use_backend):
    """Token-level ratios of completions one token wide are [B, 1]: still per token, so a masked row (logp 0 where
    the label is ignored, a real old logp) stays out of ratio_mean / kl / clip ratios on every backend (the torch
    path once took [B, 1] for per-sequence and averaged it in: ratio_mean 74.7 here)."""
    use_backend(backend)
    t = lambda rows: torch.tensor(rows, device=DEVICE)
    logp, old, ref = t([[-1.0], [0.0]]), t([[-1.0], [-5.0]]), t([[-1.0], [-3.0]])
    _, m = grpo_loss(logp, old, t([1.0, -1.0]), t([[1.0], [0.0]]), ref_logp=ref, beta=0.04)
    assert m["ratio_mean"].item() == pytest.approx(1.0)
    assert m["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert m["clip_ratio/region_mean"].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("delta", [None, 1.5], ids=["no-delta", "delta"])
@pytest.mark.parametrize("where", ["logp", "old_logp"])
@pytest.mark.parametrize("loss_type", reference.LOSS_TYPES)
def test_a_nan_log_prob_gives_a_nan_loss(loss_type, where, delta, backend, use_backend):
    """A NaN at a kept token makes the loss NaN on every backend, as in the formula (the kernels' min / max took
    the other operand: the clip family and cispo gave a finite loss from a NaN ratio), so a trainer's NaN guard
    sees it."""
    if delta is not None and loss_type in ("cispo", "sapo"):
        pytest.skip("delta is for the clip family")
    use_backend(backend)
    logp, old, adv, mask, _, _ = _inputs(torch.float32, False)
    mask = torch.ones_like(mask)
    bad = {"logp": logp, "old_logp": old}[where].clone()
    bad[0, 3] = float("nan")
    args = (bad, old) if where == "logp" else (logp, bad)
    loss, _ = grpo_loss(*args, adv, mask, loss_type=loss_type, delta=delta, max_len=T,
                        num_items=float(B * T) if loss_type == "dapo" else None)
    assert torch.isnan(loss), loss
