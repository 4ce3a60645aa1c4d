"""silu_mul: the Triton kernels (and the torch path) against a float64 reference, forward and both gradients, over
odd sizes; the custom ops' schema; bad input."""

from __future__ import annotations

import os

import pytest
import torch

from fusedrl.kernels import silu_mul
from fusedrl.kernels.swiglu import op

from .float_budget import budget, max_err

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
SHAPES = [(1,), (3, 127), (2, 5, 1031), (0, 64), (4, 2049)]  # 2049 x 4: past one 2048-element block, ragged



def _run(gate, up, dy):
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    y = silu_mul(gate, up)
    return y, torch.autograd.grad(y, [gate, up], dy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(backend, dtype, shape, use_backend):
    torch.manual_seed(hash(shape) % 2**31)
    gate = (torch.randn(shape, dtype=torch.float64, device=DEVICE) * 4).to(dtype)  # silu's curved part and tails
    up = torch.randn(shape, dtype=torch.float64, device=DEVICE).to(dtype)
    dy = torch.randn(shape, dtype=torch.float64, device=DEVICE).to(dtype)

    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    y64 = torch.nn.functional.silu(g64) * u64
    exp_grads = torch.autograd.grad(y64, [g64, u64], dy.double())

    use_backend("torch")
    base_y, base_grads = _run(gate, up, dy)
    use_backend(backend)
    got_y, got_grads = _run(gate, up, dy)

    assert got_y.dtype == dtype and got_y.shape == gate.shape
    assert max_err(got_y, y64) <= budget(max_err(base_y, y64), y64, dtype)
    for name, got, base, exp in zip(["gate", "up"], got_grads, base_grads, exp_grads):
        assert got.dtype == dtype, name
        err, allowed = max_err(got, exp), budget(max_err(base, exp), exp, dtype)
        assert err <= allowed, f"grad {name}: err {err:.3g} > {allowed:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend, use_backend):
    """Views (a half of a fused gate-up projection's output) give the same result as contiguous copies."""
    use_backend(backend)
    both = torch.randn(7, 2 * 45, device=DEVICE)
    gate, up = both[:, :45], both[:, 45:]
    expected = torch.nn.functional.silu(gate.contiguous()) * up.contiguous()
    assert torch.allclose(silu_mul(gate, up), expected, atol=1e-6, rtol=1e-5)


def test_custom_ops_pass_opcheck():
    if DEVICE == "cpu" and not INTERPRET:
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    gate, up = torch.randn(3, 37, device=DEVICE), torch.randn(3, 37, device=DEVICE)
    torch.library.opcheck(op.silu_mul_fwd, (gate, up))
    torch.library.opcheck(op.silu_mul_bwd, (torch.randn_like(gate), gate, up))


@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(3, 8), torch.randn(3, 7)), ValueError, "gate and up must have one shape, dtype and device"),
    ((torch.randn(3, 8), torch.randn(3, 8, dtype=torch.float16)), ValueError, "one shape, dtype"),
    ((torch.randn(3, 8), torch.ones(3, 8, dtype=torch.long)), TypeError, "up must be a floating-point tensor"),
    ((None, torch.randn(3, 8)), TypeError, "gate must be a torch.Tensor"),
])
def test_bad_input_is_named(args, error, match):
    with pytest.raises(error, match=match):
        silu_mul(*args)
