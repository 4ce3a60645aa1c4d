"""apply_rotary: the Triton kernel (and the torch path) against a float64 reference of transformers'
apply_rotary_pos_emb, forward and the gradients of q and k, in both layouts, with GQA, odd lengths and head dims,
strided projections' views and one cos/sin table for every row; the custom op's schema; bad input."""

from __future__ import annotations

import os

import pytest
import torch

from fusedrl.kernels import apply_rotary
from fusedrl.kernels.rotary import op, reference

from .float_budget import budget, max_err

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# (B, Hq, Hkv, S, D, cos batch)
SHAPES = [(2, 6, 2, 9, 6, 2), (1, 4, 4, 1, 128, 1), (3, 5, 1, 17, 64, 1), (2, 3, 3, 0, 8, 2)]



def _tables(cb, S, D, dtype):
    """cos / sin as transformers' rotary embedding makes them: cat(freqs, freqs) of positions x inverse freqs."""
    pos = torch.arange(S, dtype=torch.float64)[None, :] + 3 * torch.arange(cb, dtype=torch.float64)[:, None]
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = pos[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype).to(DEVICE), emb.sin().to(dtype).to(DEVICE)


def _projection(B, H, S, D, dtype, unsqueeze_dim):
    """The strided view a transformers attention module hands over: [B, S, H * D] viewed as heads."""
    x = torch.randn(B, S, H * D, dtype=torch.float64).to(dtype).to(DEVICE).view(B, S, H, D)
    return x.transpose(1, 2) if unsqueeze_dim == 1 else x


def _run(q, k, cos, sin, dq, dk, unsqueeze_dim):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    qe, ke = apply_rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    return (qe, ke), torch.autograd.grad((qe, ke), (q, k), (dq, dk))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_matches_float64(backend, dtype, shape, unsqueeze_dim, use_backend):
    B, Hq, Hkv, S, D, cb = shape
    torch.manual_seed(hash(shape) % 2**31)
    q, k = _projection(B, Hq, S, D, dtype, unsqueeze_dim), _projection(B, Hkv, S, D, dtype, unsqueeze_dim)
    cos, sin = _tables(cb, S, D, dtype)
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    exp = reference.apply_rotary(q64, k64, cos.double(), sin.double(), unsqueeze_dim)
    exp_grads = torch.autograd.grad(exp, (q64, k64), (dq.double(), dk.double()))

    use_backend("torch")
    base, base_grads = _run(q, k, cos, sin, dq, dk, unsqueeze_dim)
    use_backend(backend)
    got, got_grads = _run(q, k, cos, sin, dq, dk, unsqueeze_dim)

    for name, g, b, e in [("q", got[0], base[0], exp[0]), ("k", got[1], base[1], exp[1]),
                          ("grad q", got_grads[0], base_grads[0], exp_grads[0]),
                          ("grad k", got_grads[1], base_grads[1], exp_grads[1])]:
        assert g.shape == e.shape and g.dtype == dtype, name
        err, allowed = max_err(g, e), budget(max_err(b, e), e, dtype)
        assert err <= allowed, f"{name}: err {err:.3g} > {allowed:.3g}"


def test_the_torch_path_is_transformers_formula():
    transformers = pytest.importorskip("transformers")
    stock = transformers.models.qwen2.modeling_qwen2.apply_rotary_pos_emb
    q, k = _projection(2, 4, 5, 8, torch.float16, 1), _projection(2, 2, 5, 8, torch.float16, 1)
    cos, sin = _tables(2, 5, 8, torch.float16)
    for got, want in zip(reference.apply_rotary(q, k, cos, sin), stock(q, k, cos, sin)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_keeps_the_input_layout(backend, use_backend):
    """The rotated queries keep the projection's memory layout (no copy to [B, H, S, D]-contiguous)."""
    use_backend(backend)
    q, k = _projection(2, 4, 7, 16, torch.float32, 1), _projection(2, 2, 7, 16, torch.float32, 1)
    cos, sin = _tables(1, 7, 16, torch.float32)
    qe, ke = apply_rotary(q, k, cos, sin)
    assert qe.stride() == q.stride() and ke.stride() == k.stride()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strided", ["cos", "sin"])
def test_cos_and_sin_of_different_layouts(backend, strided, use_backend):
    """cos and sin each read with their own strides: one a slice of a longer table (the other contiguous) gives
    the formula's values (sin read with cos's strides gave wrong values, or read past sin's end on a GPU)."""
    B, H, S, D = 2, 3, 5, 8
    q, k = _projection(B, H, S, D, torch.float32, 1), _projection(B, 2, S, D, torch.float32, 1)
    cos, sin = _tables(B, 2 * S, D, torch.float32)
    cos, sin = cos[:, :S], sin[:, :S].contiguous()
    if strided == "sin":
        cos, sin = cos.contiguous(), _tables(B, 2 * S, D, torch.float32)[1][:, :S]
    assert cos.stride() != sin.stride()
    exp = reference.apply_rotary(q.double(), k.double(), cos.double(), sin.double(), 1)
    use_backend(backend)
    got = apply_rotary(q, k, cos, sin)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)


def test_cos_sin_with_gradients_take_the_torch_path(use_backend):
    use_backend("triton")  # which cannot take cos and sin with gradients: the torch formula serves
    q, k = _projection(1, 2, 3, 4, torch.float32, 1), _projection(1, 2, 3, 4, torch.float32, 1)
    cos, sin = (t.requires_grad_() for t in _tables(1, 3, 4, torch.float32))
    qe, ke = apply_rotary(q, k, cos, sin)
    g_cos, g_sin = torch.autograd.grad((qe.sum() + ke.sum()), (cos, sin))
    assert g_cos.abs().sum() > 0 and g_sin.abs().sum() > 0


def test_custom_op_passes_opcheck():
    if DEVICE == "cpu" and not INTERPRET:
        pytest.skip("the Triton kernel needs a GPU or TRITON_INTERPRET=1")
    x = _projection(2, 3, 5, 8, torch.float32, 1)
    cos, sin = _tables(2, 5, 8, torch.float32)
    for backward in (False, True):
        torch.library.opcheck(op.rotary, (x, cos, sin, backward))


def _args(**over):
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)
    cos, sin = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    args = dict(q=q, k=k, cos=cos, sin=sin)
    args.update(over)
    return args


@pytest.mark.parametrize("over, error, match", [
    (dict(k=torch.randn(1, 1, 5, 4)), ValueError, r"q and k must be \[B, H, S, D\] with one B, S and D"),
    (dict(q=torch.randn(2, 3, 4)), ValueError, "q and k must be"),
    (dict(cos=torch.randn(1, 3, 6)), ValueError, r"cos and sin must both be \[B, S, D\] = \[1, 3, 4\]"),
    (dict(sin=torch.randn(3, 4)), ValueError, "cos and sin must both be"),
    (dict(q=torch.randn(1, 2, 3, 5), k=torch.randn(1, 1, 3, 5), cos=torch.randn(1, 3, 5), sin=torch.randn(1, 3, 5)),
     ValueError, "D must be even"),
    (dict(q=torch.ones(1, 2, 3, 4, dtype=torch.long)), TypeError, "q must be a floating-point tensor"),
    (dict(cos=None), TypeError, "cos must be a torch.Tensor"),
    (dict(sin=torch.randn(1, 3, 4, dtype=torch.float64)), TypeError, "cos and sin must have one dtype"),
    (dict(unsqueeze_dim=3), ValueError, "unsqueeze_dim must be 1"),
])
def test_bad_input_is_named(over, error, match):
    with pytest.raises(error, match=match):
        apply_rotary(**_args(**over))
