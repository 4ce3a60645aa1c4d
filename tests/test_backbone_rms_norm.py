"""rms_norm: the Triton kernels (and the torch path) against a float64 reference of transformers' RMSNorm, forward
and both gradients, over odd widths, strided rows, mixed weight dtypes and a frozen weight; the custom ops' schema;
bad input."""

from __future__ import annotations

import os

import pytest
import torch

from fusedrl.kernels import rms_norm
from fusedrl.kernels.rms_norm import op, reference

from .float_budget import budget, max_err

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# 1030 rows: several rows per backward program; 4096 wide: the 16-warp reductions of an LM's hidden size
SHAPES = [(1, 1), (3, 127), (2, 5, 1025), (0, 64), (1030, 48), (2, 4096)]



def _run(x, w, dy, eps):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_(w.requires_grad)
    y = rms_norm(x, w, eps)
    grads = torch.autograd.grad(y, [x, w] if w.requires_grad else [x], dy)
    return y, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("weight", ["same", "fp32", "frozen"])
def test_matches_float64(backend, dtype, shape, weight, use_backend):
    torch.manual_seed(hash((shape, weight)) % 2**31)
    H = shape[-1]
    x = (torch.randn(shape, dtype=torch.float64, device=DEVICE) * 3).to(dtype)
    w_dtype = torch.float32 if weight == "fp32" else dtype
    w = (1 + 0.5 * torch.randn(H, dtype=torch.float64, device=DEVICE)).to(w_dtype).requires_grad_(weight != "frozen")
    out_dtype = torch.promote_types(dtype, w_dtype)
    dy = torch.randn(shape, dtype=torch.float64, device=DEVICE).to(out_dtype)
    eps = 1e-6

    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_(w.requires_grad)
    h = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    y64 = w64 * h
    exp_grads = torch.autograd.grad(y64, [x64, w64] if w.requires_grad else [x64], dy.double())

    use_backend("torch")
    base_y, base_grads = _run(x, w, dy, eps)
    use_backend(backend)
    got_y, got_grads = _run(x, w, dy, eps)

    assert got_y.dtype == base_y.dtype == out_dtype and got_y.shape == x.shape
    assert max_err(got_y, y64) <= budget(max_err(base_y, y64), y64, out_dtype)
    for name, got, base, exp in zip(["x", "weight"], got_grads, base_grads, exp_grads):
        assert got.dtype == base.dtype and got.shape == base.shape, name
        err, allowed = max_err(got, exp), budget(max_err(base, exp), exp, got.dtype)
        assert err <= allowed, f"grad {name}: err {err:.3g} > {allowed:.3g}"


def test_the_torch_path_is_transformers_formula():
    """Bit-equal to transformers' Qwen2RMSNorm (Llama's, Mistral's are the same code)."""
    transformers = pytest.importorskip("transformers")
    norm = transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm(33, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 33, dtype=torch.float16)
    assert torch.equal(reference.rms_norm(x, norm.weight, 1e-5), norm(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows(backend, use_backend):
    """Rows of a wider tensor (a slice of the last dimension) are read in place and give the same result."""
    use_backend(backend)
    wide = torch.randn(6, 80, device=DEVICE)
    w = torch.randn(64, device=DEVICE)
    assert torch.allclose(rms_norm(wide[:, :64], w), reference.rms_norm(wide[:, :64].contiguous(), w, 1e-6),
                          atol=1e-6, rtol=1e-5)
    transposed = torch.randn(64, 6, device=DEVICE).t()  # last dimension strided: copied first
    assert torch.allclose(rms_norm(transposed, w), reference.rms_norm(transposed.contiguous(), w, 1e-6),
                          atol=1e-6, rtol=1e-5)
    # one element in: rows that start off the 16-byte alignment a GPU launch specializes on; and the backward
    # with an incoming gradient whose rows are strided too
    x = wide[:, 1:65].detach().requires_grad_()
    w = w.detach().requires_grad_()
    dy = torch.randn(6, 96, device=DEVICE)[:, 3:67]
    y = rms_norm(x, w)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = torch.autograd.grad(reference.rms_norm(x64, w64, 1e-6), (x64, w64), dy.double())
    torch.testing.assert_close(y.double(), reference.rms_norm(x64, w64, 1e-6), atol=1e-5, rtol=1e-5)
    for got, exp in zip((gx, gw), want):
        torch.testing.assert_close(got.double(), exp, atol=1e-4, rtol=1e-4)


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck of both custom ops (schema, fake tensors, aliasing)."""
    if DEVICE == "cpu" and not INTERPRET:
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    x = torch.randn(5, 37, device=DEVICE)
    w = torch.randn(37, device=DEVICE)
    torch.library.opcheck(op.rms_norm_fwd, (x, w, 1e-6))
    _, rstd = op.rms_norm_fwd(x, w, 1e-6)
    for want_dw in (True, False):
        torch.library.opcheck(op.rms_norm_bwd, (torch.randn_like(x), x, w, rstd, want_dw))


@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(3, 8), torch.randn(7)), ValueError, r"weight must have shape \[H\] = \[8\]"),
    ((torch.randn(3, 8), torch.randn(1, 8)), ValueError, "weight must have shape"),
    ((torch.randint(0, 3, (3, 8)), torch.randn(8)), TypeError, "x must be a floating-point tensor"),
    (([1.0, 2.0], torch.randn(2)), TypeError, "x must be a torch.Tensor"),
    ((torch.randn(3, 8), torch.randn(8), -1.0), ValueError, "eps must be a finite float >= 0"),
    ((torch.randn(3, 8), torch.randn(8), float("nan")), ValueError, "eps must be"),
])
def test_bad_input_is_named(args, error, match):
    with pytest.raises(error, match=match):
        rms_norm(*args)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")
def test_weight_on_another_device_is_named():
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        rms_norm(torch.randn(3, 8, device="cuda"), torch.randn(8))
