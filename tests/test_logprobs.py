"""logprobs_from_logits on every backend that runs here, against the float64 naive formula."""

from __future__ import annotations

import os

import pytest
import torch

from fusedrl.kernels import logprobs_from_logits
from fusedrl.kernels.logprobs import reference
from fusedrl.kernels.logprobs.op import logprobs_bwd, logprobs_fwd

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
BACKENDS = ["torch", "triton"] + (["cuda"] if DEVICE == "cuda" else [])
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# (shape of logits, slice the time axis like `logits[:, :-1]`)
SHAPES = [((127, 50257), False), ((3, 8, 1025), True), ((2, 5, 96), False), ((1, 1, 1), False)]


def _inputs(shape, sliced, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(DEVICE)
    logits64 = full[:, :-1] if sliced else full
    V = shape[-1]
    labels = torch.randint(0, V, logits64.shape[:-1], generator=g).to(DEVICE)
    labels.view(-1)[:: 3] = -100  # every third position ignored
    return logits64.to(dtype), labels


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "sliced"), SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else ("sliced" if v else "whole"))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_float64(backend, dtype, shape, sliced, temperature, use_backend):
    logits, labels = _inputs(shape, sliced, dtype)
    V = logits.shape[-1]
    g = torch.Generator().manual_seed(1)
    w_logp = torch.randn(labels.shape, generator=g, dtype=torch.float64).to(DEVICE)
    w_ent = torch.randn(labels.shape, generator=g, dtype=torch.float64).to(DEVICE)

    def run(fn_logits, fn):
        x = fn_logits.detach().requires_grad_()
        logp, ent = fn(x)
        (grad,) = torch.autograd.grad((logp.double() * w_logp).sum() + (ent.double() * w_ent).sum(), x)
        return logp, ent, grad

    naive = lambda x: tuple(t.reshape(labels.shape) for t in reference.naive(
        x.reshape(-1, V), labels.reshape(-1), temperature, -100))
    exp = run(logits.double(), naive)
    base = run(logits, naive)  # the naive formula at the input dtype (math in fp32): the error budget
    use_backend(backend)
    got = run(logits, lambda x: logprobs_from_logits(x, labels, temperature=temperature, return_entropy=True))
    assert got[2].shape == logits.shape and got[2].dtype == dtype
    for name, a, b, e in zip(("logp", "entropy", "grad"), got, base, exp):
        ulp = torch.finfo(dtype if name == "grad" else torch.float32).eps * max(1.0, e.abs().max().item())
        budget = 4 * _err(b, e) + 16 * ulp  # 16 ulp: the torch path's chunked sums on an H200 (fp32, V = 50257)
        assert _err(a, e) <= budget, f"{name}: {_err(a, e):.3g} > {budget:.3g}"
    assert (got[0] <= 0).all()
    ignored = labels == -100
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()
    assert (got[2][ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logp_only_and_peaked_rows_are_never_positive(backend, use_backend):
    use_backend(backend)
    logits = torch.full((4, 1000), -30.0, device=DEVICE)
    labels = torch.tensor([0, 1, 2, 3], device=DEVICE)
    logits[torch.arange(4), labels] = 30.0  # p(label) = 1 - 1e-23: logp rounds to 0, never above
    logits.requires_grad_()
    logp = logprobs_from_logits(logits, labels)
    assert logp.shape == (4,) and (logp <= 0).all()
    logp.sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_are_masked_tokens(backend, use_backend):
    """Masked vocabulary entries (-inf) have p = 0: finite logp, entropy and gradient."""
    use_backend(backend)
    logits = torch.randn(3, 33, device=DEVICE)
    logits[:, 20:] = float("-inf")
    labels = torch.tensor([0, 5, 19], device=DEVICE)
    x = logits.clone().requires_grad_()
    logp, ent = logprobs_from_logits(x, labels, return_entropy=True)
    want_logp, want_ent = reference.naive(logits[:, :20].double(), labels, 1.0, -100)
    torch.testing.assert_close(logp.double(), want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), want_ent, rtol=1e-5, atol=1e-5)
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, 20:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_logit_gives_nan_not_a_certain_token(backend, use_backend):
    """A row with a NaN (an overflowed model) must read NaN in logp and entropy, as the torch formula gives, so the
    trainers' guards see it; clamping logp at 0 with a minimum that drops NaN made it 0 (probability 1)."""
    use_backend(backend)
    logits = torch.randn(3, 40, device=DEVICE)
    logits[1, 7] = float("nan")
    logp, ent = logprobs_from_logits(logits, torch.tensor([3, 3, 3], device=DEVICE), return_entropy=True)
    assert logp[1].isnan() and ent[1].isnan()
    assert torch.isfinite(logp[[0, 2]]).all() and torch.isfinite(ent[[0, 2]]).all()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: logprobs_from_logits(torch.randn(2, 5), torch.tensor([0, 5])), ValueError,
         r"labels must lie in \[0, 5\)"),
        (lambda: logprobs_from_logits(torch.randn(2, 5), torch.tensor([0, -1])), ValueError, "labels must lie"),
        (lambda: logprobs_from_logits(torch.randn(2, 5), torch.tensor([0.0, 1.0])), TypeError, "labels must be an int"),
        (lambda: logprobs_from_logits(torch.randn(2, 5).long(), torch.tensor([0, 1])), TypeError, "logits must be a "
         "floating"),
        (lambda: logprobs_from_logits(torch.randn(2, 5), torch.tensor([0, 1, 2])), ValueError,
         r"labels has shape \(3,\)"),
        (lambda: logprobs_from_logits(torch.randn(5), torch.tensor(0)), ValueError, r"logits must have shape \[N, V\]"),
        (lambda: logprobs_from_logits(torch.randn(2, 5), torch.tensor([0, 1]), temperature=0.0), ValueError,
         "temperature must be a finite float > 0"),
        (lambda: logprobs_from_logits(torch.randn(2, 5), torch.tensor([0, 1]).to("meta")), ValueError,
         "labels is on meta"),
    ],
)
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_torch_path_is_chunked(monkeypatch, use_backend):
    """The CPU path processes a few rows at a time and gives the same numbers as in one block."""
    use_backend("torch")
    logits, labels = _inputs((2, 9, 300), False, torch.float32)
    whole = logprobs_from_logits(logits, labels, return_entropy=True)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 700)  # 2 rows per chunk
    chunked = logprobs_from_logits(logits, labels, return_entropy=True)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(), reason="Triton needs a GPU or the interpreter")
def test_opcheck_and_compile(use_backend):
    logits = torch.randn(2, 3, 40, device=DEVICE)
    labels = torch.randint(0, 40, (2, 3), device=DEVICE)
    torch.library.opcheck(logprobs_fwd, (logits, labels, 0.9, -100, True, "triton"))
    lse = torch.randn(2, 3, device=DEVICE)
    ent = torch.rand(2, 3, device=DEVICE)
    torch.library.opcheck(logprobs_bwd, (logits, labels, lse, ent, torch.randn(2, 3, device=DEVICE),
                                         torch.randn(2, 3, device=DEVICE), 0.9, -100, "triton"))
    use_backend("triton")
    x = logits.clone().requires_grad_()

    def loss(x):
        logp, ent = logprobs_from_logits(x[:, :-1], labels[:, 1:], temperature=0.9, return_entropy=True)
        return logp.sum() + 0.1 * ent.sum()

    got = torch.compile(loss, backend="aot_eager", fullgraph=True)(x)
    (g1,) = torch.autograd.grad(got, x)
    want = loss(x)
    (g2,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g1, g2)
