"""The custom ops are registered correctly (opcheck) and torch.compile traces a step with no graph break."""

from __future__ import annotations

import os

import pytest
import torch

from fusedrl.kernels import ddim_step, flow_sde_step
from fusedrl.kernels.diffusion_step.op import diffusion_step_bwd, diffusion_step_fwd
from fusedrl.kernels.diffusion_step.triton_kernels import DDIM, FLOW_SDE

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="the Triton backend needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _tensors(mode, sampled, with_ref):
    B, D = 2, 37
    x, m = torch.randn(B, D, device=DEVICE), torch.randn(B, D, device=DEVICE)
    if mode == DDIM:
        p0, p1 = torch.tensor([0.3, 0.6], device=DEVICE), torch.tensor([0.4, 0.7], device=DEVICE)
    else:
        p0, p1 = torch.tensor([0.8, 0.5], device=DEVICE), torch.tensor([0.7, 0.3], device=DEVICE)
    noise = torch.randn(B, D, device=DEVICE) if sampled else None
    given = None if sampled else torch.randn(B, D, device=DEVICE)
    ref = torch.randn(B, D, device=DEVICE) if with_ref else None
    return x, m, p0, p1, noise, given, ref


# The ops carry no autograd formula of their own (DiffusionStep pairs them, see op.py), so opcheck
# checks schema, fake tensors and dynamic-shape tracing on inputs that need no grad; gradients are
# checked through the public functions (test_diffusion_step.py and the compile test below).
@pytest.mark.parametrize("sampled", [True, False])
@pytest.mark.parametrize("with_ref", [True, False])
@pytest.mark.parametrize(("mode", "clip"), [(FLOW_SDE, 0.0), (DDIM, 0.0), (DDIM, 1.0)])
def test_opcheck(mode, clip, sampled, with_ref):
    tensors = _tensors(mode, sampled, with_ref)
    scalars = (mode, 0, 0.7, float("nan"), clip, False)
    torch.library.opcheck(diffusion_step_fwd, tensors + scalars + (True, torch.float32, "triton"))
    x = tensors[0]
    grads = (torch.randn_like(x) if sampled else None, torch.randn_like(x), torch.randn(x.shape[0], device=DEVICE),
             torch.randn(x.shape[0], device=DEVICE) if with_ref else None)
    torch.library.opcheck(diffusion_step_bwd, tensors + grads + scalars + (with_ref, "triton"))


def test_compile_fullgraph_forward_and_backward(use_backend):
    use_backend("triton")
    x = torch.randn(2, 4, 8, 8, device=DEVICE, requires_grad=True)
    v = torch.randn(2, 4, 8, 8, device=DEVICE, requires_grad=True)
    prev = torch.randn(2, 4, 8, 8, device=DEVICE)
    ref = torch.randn(2, 4, 8, 8, device=DEVICE)

    def loss_fn(x, v):
        out = flow_sde_step(x, v, torch.tensor([0.8, 0.6]), 0.5, prev_sample=prev, ref_mean=ref)
        ddim = ddim_step(v, x, 0.3, 0.5, prev_sample=prev)
        return out.logp.sum() + 0.1 * out.kl.sum() + ddim.logp.sum()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    got = compiled(x, v)
    gx, gv = torch.autograd.grad(got, (x, v))
    want = loss_fn(x, v)
    wx, wv = torch.autograd.grad(want, (x, v))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(gv, wv)
